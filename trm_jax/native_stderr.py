"""One line, not a C++ stack dump, when a multi-process run loses a process.

When process 0 (the coordinator) of a multi-process run dies, JAX's coordination client
in every other process aborts it at once from a C++ thread: a glog ``F`` line, gRPC
details and a stack dump of ~40 lines, before any Python can run (its
``missed_heartbeat_callback`` cannot take a Python function: the status it passes does not
convert). So each process of such a run sends its native stderr through this filter, a
small child process (:func:`install`) that outlives an abort: it passes every line
through except the coordination service's own log lines, and turns the fatal one and
the dump after it into ONE ``error:`` line. ``TRM_JAX_VERBOSE=1`` turns the filter off.
"""
from __future__ import annotations

import atexit
import io
import os
import re
import subprocess
import sys
from typing import Iterable, Iterator

#: A glog line: severity, date, time, thread, ``file:line]``.
_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./-]+):\d+\] ?(.*)$")
# Native files whose log lines are the coordination service's view of a lost process.
_COORDINATION = ("coordination", "client.h", "distributed")


def filter_lines(lines: Iterable[str], process: str) -> Iterator[str]:
    """``lines`` of a process's stderr -> what the user sees (newlines kept).

    Dropped: glog lines of the coordination service; from a fatal glog line on,
    everything (the dump), replaced by one ``error:`` line naming ``process``."""
    for line in lines:
        match = _GLOG.match(line)
        if match is None:
            yield line
            continue
        severity, source, message = match.groups()
        if severity == "F":
            if "distributed service detected fatal errors" in message:
                yield (f"error: process {process}: another process of this run stopped (the "
                       "coordination service lost it: killed, or out of memory?), so JAX ends "
                       "this one too; start every process again with the same command plus "
                       "--resume\n")
            else:
                yield f"error: process {process}: JAX stopped with a fatal error: {message}\n"
            for _ in lines:  # the rest is the stack dump: read, not shown
                pass
            return
        if not any(word in source for word in _COORDINATION):
            yield line


def install(process: int | None) -> None:
    """Routes this process's stderr (fd 2) through :func:`filter_lines` in a child process.
    Nothing with ``TRM_JAX_VERBOSE`` set, or when stderr is not a real file descriptor."""
    if os.environ.get("TRM_JAX_VERBOSE"):
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):
        return
    read, write = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "trm_jax.native_stderr", str(process)],
                             stdin=read, stdout=original, stderr=original, close_fds=True)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    os.close(original)
    _CHILD.append(child)
    atexit.register(finish)


# The filter process of this process's stderr, once installed.
_CHILD: list[subprocess.Popen] = []


def finish() -> None:
    """Before this process exits (also by ``os._exit``): stderr is closed, and the filter
    is given a moment to write what is left, so a line is never lost to the exit."""
    if not _CHILD:
        return
    try:
        sys.stderr.flush()
        os.close(2)
        _CHILD.pop().wait(timeout=5)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass


def main() -> None:
    process = sys.argv[1] if len(sys.argv) > 1 else "?"
    stdin = io.TextIOWrapper(sys.stdin.buffer, errors="replace")
    for line in filter_lines(iter(stdin.readline, ""), process):
        sys.stdout.write(line)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
