"""One cell measured in this process, no Ray: warmup, repeats, memory tracking, OOM handling, the row."""
