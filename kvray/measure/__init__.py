"""What a measurement records (RunTrace, CellResult), how metrics are computed from it, and memory trackers."""
