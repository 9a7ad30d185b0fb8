"""One cell measured in this process, no Ray: warmup, repeats, memory tracking, OOM handling, the row (``run``),
the saturation search over open-loop rates (``saturation``) and a cell's telemetry timeline (``timeline``).

Every caller runs a cell through ``kvray.runner.run.run_cell``: ``kvray bench``, each Ray worker, the in-process sweep.
"""
