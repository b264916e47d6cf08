"""Training one run: the runner, how its model executes (precision, compile, DDP), the optimiser, the end-of-run
evaluation, per-epoch statistics and resources.
"""
