"""``python -m g2rpo.plan``: a run's memory, FLOPs and time, from its iteration executed on fake weights.

:mod:`~g2rpo.plan.fake` builds the real models without data, :mod:`~g2rpo.plan.execute` runs one iteration
of the run's own algorithm on them, :mod:`~g2rpo.plan.meter` counts FLOPs and memory,
:mod:`~g2rpo.plan.replay` makes repeated forwards cheap to plan, :mod:`~g2rpo.plan.planner` turns the
execution into per-rank figures on named GPUs (:mod:`~g2rpo.plan.gpus`), :mod:`~g2rpo.plan.levers` re-plans
a misfit. docs/planning.md.
"""
