"""One cell measured in this process, no Ray: warmup, repeats, memory tracking, OOM handling, the row (``run``),
the saturation search over open-loop rates (``saturation``) and a cell's telemetry timeline (``timeline``); and
N vLLM replicas behind kvray's router, one load per routing policy (``routed``: ``kvray route``'s measurement).

Every caller runs a cell through ``kvray.runner.run.run_cell``: ``kvray bench``, each Ray worker, the in-process sweep.
"""
