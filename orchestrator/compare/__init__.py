"""Method comparisons with error bars: every method of ``compare.methods`` trained once per
seed of ``compare.seeds`` at one budget, as one Ray Tune grid, then evaluated on the same
held-out set and summarised with means, standard deviations and, for each method, the
paired difference to ``compare.baseline`` with a t confidence interval over seeds.

A seed fixes the student's initial weights, the batches of every rank and their
augmentation (``seed`` of the experiment; README "Reproducibility"), so method A and the
baseline at seed k see the same start and the same batches (tests/test_reproducible.py
checks the audits of two methods at one seed are identical): their difference at seed k is
a paired sample, and the interval of the mean difference is Student's t with n - 1 degrees
of freedom over the n seeds both completed.

The package's rooms: :mod:`~orchestrator.compare.cells` (the cells, their runs and the
summary's column names), :mod:`~orchestrator.compare.grid` (training and evaluating the
grid), :mod:`~orchestrator.compare.statistics` (spreads and paired intervals) and
:mod:`~orchestrator.compare.report` (Markdown, CSV and PNG).
"""
