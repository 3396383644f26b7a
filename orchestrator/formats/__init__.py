"""The files a run leaves behind, one module each with its reader and writer side by side: the training
state of a checkpoint, the exported student (``student.pt``) and this project's teacher
checkpoint. Training, evaluation, export, retraining and tuning all read them from here.

**Nothing loaded here can run code.** Every file is read with ``torch.load(...,
weights_only=True)``: tensors, numbers, strings and the builtin containers only. A file
that asks for anything else (a pickled object whose ``__reduce__`` would call a function)
is refused with :class:`ArtifactError` naming the file and the global it asked for. That
holds for the checkpoints of a run we wrote ourselves too: anyone who can write to the
storage path could otherwise run code in every worker on resume.
"""
