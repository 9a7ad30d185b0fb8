"""A Ray Client driver cut off from its cluster ends with one kvray line, not with grpc's threads' tracebacks
(kvray/sweep/ray_env.py ``quiet_grpc_threads``; the real cut is tests/test_partitions.py, cluster tier).

grpc's connectivity-poll thread dies with "ValueError: Cannot monitor channel state: Channel closed!" when the
channel closes under it. Here a thread runs code compiled under a grpc file name (as grpc/_channel.py is) and one
under kvray's own name: the first is silent, the second still prints its traceback."""

import threading

import pytest

from kvray.sweep.ray_env import quiet_grpc_threads

RAISE = "def poll():\n    raise ValueError('Cannot monitor channel state: Channel closed!')\n"


def thread_raising_in(filename: str) -> None:
    scope: dict = {}
    exec(compile(RAISE, filename, "exec"), scope)
    thread = threading.Thread(target=scope["poll"])
    thread.start()
    thread.join()


@pytest.fixture
def passed_on():
    """The exceptions the quiet hook passes on to the hook it replaced (here a recorder: pytest's own would turn
    them into warnings)."""
    before, seen = threading.excepthook, []
    threading.excepthook = seen.append
    quiet_grpc_threads()
    quiet_grpc_threads()  # twice: installed once
    yield seen
    threading.excepthook = before


def test_only_grpcs_own_threads_are_silenced(passed_on):
    thread_raising_in("/venv/lib/python3.11/site-packages/grpc/_channel.py")
    assert passed_on == []
    thread_raising_in("/work/kvray/sweep/collector.py")
    assert [str(args.exc_value) for args in passed_on] == ["Cannot monitor channel state: Channel closed!"]
