"""Ctrl-C, SIGTERM and SIGHUP unwind a run like an error, so its partial output is removed; the few steps
that must not be cut in half (moving a finished output into place) hold the signals until they are done."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

STOPPING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; the message says what became of its output."""


IMPORT_PATIENCE_S = 10.0  # how long a stop waits for an import to finish (an import stuck on a lock must not hang)
deferred_since: list[float] = []  # when the stop now waiting for an import first landed


def stop_run(signum, frame) -> None:
    """A stop signal unwinds the run: Ctrl-C as Python's KeyboardInterrupt, the others as Interrupted.

    It is sent again a moment later, to land in the run's own code, where it lands in
    - an object's finaliser (`__del__`, run by the garbage collector anywhere): Python prints the exception there
      and the run goes on;
    - an import: an extension module cut halfway cannot be imported again ("cannot load module more than once per
      process", numpy), and torch, importing numpy from C++, clears any error that import raises and goes on, so
      the stop is lost (1 Ctrl-C in 5 in the half-second of torch's import on a 2-core machine, the run then
      finished with exit 0). An import waits at most IMPORT_PATIENCE_S."""
    waiting = False
    if in_import(frame):
        if not deferred_since:
            deferred_since.append(time.monotonic())
        waiting = time.monotonic() - deferred_since[0] < IMPORT_PATIENCE_S
    if in_finaliser(frame) or waiting:
        timer = threading.Timer(0.02, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    deferred_since.clear()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def in_finaliser(frame, depth: int = 8) -> bool:
    """Whether `frame`, or one of the `depth` frames that called it, is an object's `__del__`."""
    while frame is not None and depth > 0:
        if frame.f_code.co_name == "__del__":
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def in_import(frame) -> bool:
    """Whether `frame` runs inside an import (a frame of Python's import machinery calls it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def ignore_stop_signals() -> None:
    """Called once a stop is being reported: later stop signals change nothing. The run is over, and a second
    Ctrl-C landing as the process exits would end it by the signal (exit -2) instead of its exit code (130), or
    print a traceback from the interpreter's shutdown. Not at the signal itself: one that lands where Python
    swallows the exception (an object's __del__) stops nothing, and the next must still work."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in STOPPING:
        if signal.getsignal(number) is stop_run:
            signal.signal(number, signal.SIG_IGN)


def stop_on_signals() -> dict[int, object]:
    """Make SIGTERM and SIGHUP (a closed terminal, a dropped ssh session) stop a run as Ctrl-C does (`stop_run`).
    A signal ignored when composer starts (`nohup` ignores SIGHUP, a background job SIGINT)
    stays ignored. Returns the handlers it replaced, for a caller that goes on after the run (the tests)."""
    replaced = {}
    for number in STOPPING:
        handler = signal.getsignal(number)
        if handler != signal.SIG_IGN:
            replaced[number] = handler
            signal.signal(number, stop_run)
    return replaced


@contextmanager
def signals_held():
    """Signals that stop a run wait until the block is done, then act as they would have (main thread only;
    elsewhere nothing changes). Blocking the signal would not do: the kernel hands a process's signal to any
    of its threads that does not block it, and Python then runs the handler in the main thread at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.getsignal(number) for number in STOPPING}
    for number in STOPPING:
        signal.signal(number, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught and not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # (a run already stopping needs no other)
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), caught[0])  # the default action (the process ends), now that the block is done
