"""The live view of a large sweep stays readable: past GROUP_ABOVE workers, one line per node and GPU type."""

from __future__ import annotations

import io

from kvray.sweep.progress import GROUP_ABOVE, RichView, WorkerRow, group_rows


def _fleet() -> list[WorkerRow]:
    """64 workers on 8 nodes of 8 GPUs (A100 and H100 alternating), in the states a sweep mid-way has."""
    rows = []
    for node in range(8):
        for gpu in range(8):
            index = node * 8 + gpu
            state = "busy" if gpu < 5 else ("idle" if gpu < 7 else "starting")
            rows.append(
                WorkerRow(
                    f"w{index}.1",
                    "A100" if node % 2 == 0 else "H100",
                    cells=index % 3,
                    now=state,
                    node=f"node{node:04d}" if state != "starting" else "",
                    state=state,
                    busy_s=float(gpu) if state == "busy" else 0.0,
                )
            )
    return rows


def test_64_workers_read_as_one_line_per_node_and_type():
    groups = group_rows(_fleet())
    started = [g for g in groups if g.node != "(starting)"]
    assert len(started) == 8 and [g.workers for g in started] == [7] * 8
    assert all(g.states == {"busy": 5, "idle": 2} for g in started)
    assert all(g.longest_s == 4.0 for g in started)  # the busy workers are on cells of 0–4 s
    waiting = [g for g in groups if g.node == "(starting)"]
    assert [(g.hardware, g.workers) for g in waiting] == [("A100", 4), ("H100", 4)]
    assert sum(g.workers for g in groups) == 64 and sum(g.cells for g in groups) == sum(i % 3 for i in range(64))
    assert started[0].describe() == "7 workers: 5 busy, 2 idle, longest cell 4 s"


def test_the_rendered_view_has_a_line_per_group_past_the_threshold():
    from rich.console import Console

    view = RichView()
    view.on_start("scale", total=100, already=0)
    view.live.stop()
    for workers, lines in ((_fleet()[:GROUP_ABOVE], GROUP_ABOVE), (_fleet(), 10)):
        buffer = io.StringIO()
        Console(file=buffer, width=160).print(view._render(workers))
        body = buffer.getvalue().splitlines()[2:]  # the progress bar, then the table's header
        assert len([line for line in body if line.strip()]) == lines, body
    view.live = None
