"""From a job file (or an experiment's flags) to a validated Job and its cells, grouped and ordered small to large."""
