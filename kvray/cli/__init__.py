"""The Typer command line: parse the flags, make one library call, render the answer.

app.py builds the app and ``main``; model_cmds, bench_cmd, run_cmds and output_cmds hold the commands;
options.py the flags several commands share; render.py every table and line printed.
"""

from kvray.cli.app import app, main

__all__ = ["app", "main"]
