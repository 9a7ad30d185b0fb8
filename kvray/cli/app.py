"""The ``kvray`` Typer app: every command registered in the order ``kvray --help`` lists them, and ``main``,
the entry point that turns a user's mistake into one line and exit code 2.

Startup cost is the point of this file's shape: only typer and the small command modules load here; each
command imports what it needs (torch, ray, pandas, rich) when it runs. Help is click's plain formatter
(``rich_markup_mode=None``): typer's rich help imports rich, markdown-it and pygments, about 0.3 s of the
0.5 s budget for ``kvray --help`` (benchmarks/cli_startup.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from kvray.cli import bench_cmd, compare_cmd, model_cmds, output_cmds, plan_cmd, run_cmds, trace_cmd, validate_cmd
from kvray.cli.options import Command, SpaceListCommand
from kvray.cli.route_cmd import route
from kvray.errors import KvrayInputError


class _Group(typer.core.TyperGroup):
    """Lists each command with its whole first docstring line (click would cut it at 45 characters)."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [
            (name, cmd.get_short_help_str(limit=200))
            for name in self.list_commands(ctx)
            if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# In the order `kvray --help` lists them; list flags of the exp commands and predict take space-separated
# values (`-c 1 2 4 8`), as the seed's CLI did.
COMMANDS: tuple[tuple[Callable[..., Any], type[Command]], ...] = (
    (model_cmds.info, Command),
    (model_cmds.env, Command),
    (model_cmds.check, Command),
    (bench_cmd.bench, Command),
    (trace_cmd.trace, Command),
    (output_cmds.plot, Command),
    (output_cmds.report, Command),
    (compare_cmd.compare, Command),
    # here: one command per registered experiment (kvray/experiments/), in registry order
    (model_cmds.predict, SpaceListCommand),
    (model_cmds.calibrate, Command),
    (validate_cmd.validate, Command),
    (plan_cmd.plan, SpaceListCommand),
    (route, SpaceListCommand),
    (run_cmds.run, Command),
    (run_cmds.launch, Command),
)


def new_app() -> typer.Typer:
    """The app with COMMANDS and, after ``compare``, one command per experiment registered now (a test that
    registers one builds an app of its own)."""
    app = typer.Typer(
        name="kvray",
        help="wrk for LLM inference, KV edition: measure, predict and plot KV-cache bottlenecks.",
        cls=_Group,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"max_content_width": 120},  # use a wide terminal; click wraps at 80 otherwise
    )
    for command, cls in COMMANDS:
        app.command(cls=cls)(command)
        if command is compare_cmd.compare:
            for name, exp_command in run_cmds.experiment_commands():
                app.command(name=name, cls=SpaceListCommand)(exp_command)
    return app


app = new_app()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        from typer._click import exceptions as click_exceptions  # typer >= 0.20 vendors click
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef]

    try:
        result = app(args=argv, prog_name="kvray", standalone_mode=False)
    except KvrayInputError as exc:
        sys.stderr.write(f"kvray: error: {exc}\n")
        sys.exit(2)
    except click_exceptions.UsageError as exc:
        if isinstance(exc, getattr(click_exceptions, "NoArgsIsHelpError", ())):  # bare `kvray`: the help
            sys.stdout.write(exc.format_message() + "\n")
        else:
            sys.stderr.write(f"kvray: error: {exc.format_message()}\n")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("kvray: interrupted; finished cells are kept — rerun the same command to resume\n")
        sys.exit(130)
    except BrokenPipeError:  # `kvray info … | head`
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
