"""Running a job somewhere else and bringing its dataset home: the Ray Jobs API (``jobs_api``), clusters brought up
from a launcher file (``cluster_up``), the cluster's Python checked before submitting (``preflight``), the dataset
pulled back through Ray (``transfer``), and the one path under ``kvray run``/``launch``/exp (``submit``).

A stage after the sweep: a launched job runs ``kvray run`` (the sweep) on the cluster; the sweep never imports this.
"""
