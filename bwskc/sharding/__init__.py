"""Running a program split along one CALM axis over N processes: ``module`` (the executor and
``ShardedModule``), ``collectives`` (differentiable functional collectives, logged), ``reducers`` (the
all-reduce executors), ``check`` (N spawned processes against the eager model). Above both the passes
(the schedule is ``passes/calm/schedule.py``) and the runtime (the denotation it runs)."""
