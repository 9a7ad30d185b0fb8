"""Views of a dataset and the findings computed from it; calibration of the simulator from measured rows."""
