"""The Typer command line: parse the flags, make one library call, render the answer."""

from kvray.cli.app import app, main

__all__ = ["app", "main"]
