"""Ctrl-C, SIGTERM and SIGHUP unwind a run like an error, so its partial output is removed; the few steps
that must not be cut in half (moving a finished output into place) hold the signals until they are done."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

STOPPING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; the message says what became of its output."""


def stop_once(signum, frame) -> None:
    """The first stop signal unwinds the run (Ctrl-C as Python's KeyboardInterrupt, the others as Interrupted);
    every later one is ignored. The run is already stopping, its clean-up holds signals anyway, and a second
    Ctrl-C landing as the process exits would end it by the signal (exit -2) instead of its exit code (130)."""
    for number in STOPPING:
        if signal.getsignal(number) is stop_once:
            signal.signal(number, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def stop_on_signals() -> dict[int, object]:
    """Make SIGTERM and SIGHUP (a closed terminal, a dropped ssh session) stop a run as Ctrl-C does, each signal
    once (`stop_once`). A signal ignored when composer starts (`nohup` ignores SIGHUP, a background job SIGINT)
    stays ignored. Returns the handlers it replaced, for a caller that goes on after the run (the tests)."""
    replaced = {}
    for number in STOPPING:
        handler = signal.getsignal(number)
        if handler != signal.SIG_IGN:
            replaced[number] = handler
            signal.signal(number, stop_once)
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
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), caught[0])  # the default action (the process ends), now that the block is done
