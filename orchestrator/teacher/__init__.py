"""Everything about the teacher, in one package:

- :mod:`~orchestrator.teacher.checkpoint`: this project's teacher checkpoint (the
  ``teacher`` role's output), its writer and reader;
- :mod:`~orchestrator.teacher.models`: any teacher backbone as a frozen module (ours,
  insightface ``.pth``, TorchScript, ONNX), with its input geometry and normalisation;
- :mod:`~orchestrator.teacher.classifiers`: the three ways to build the inherited
  classifier (the trained head, arcface_torch's Partial FC shards, mean embeddings) and
  the multistep teacher schedule's files;
- :mod:`~orchestrator.teacher.mean_embedding`: the mean-embedding classifier computed on
  Ray Data for large datasets;
- :mod:`~orchestrator.teacher.importing`: ``jobs.import_teacher`` (a teacher backbone and
  its classifier brought in with a card).
"""
