"""Running many runs: grids, executors (local, Ray) and torchrun data parallelism."""
