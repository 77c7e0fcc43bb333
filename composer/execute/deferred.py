"""A plan's deferred checks (`Plan.deferred_checks`: whether transformers would load the output, which takes
seconds to import) on a thread of their own, so that they overlap the reading, merging and writing instead of
coming before it. The executor starts them once the first tensor is written and waits for them before the
output folder is committed: a check that fails fails the run, and nothing appears at OUT."""

from __future__ import annotations

import threading
from collections.abc import Callable

# What the checks add to the process: transformers' modeling code and a model built on the meta device (measured
# at ~170 MB for a 16-layer Llama with torch 2.13 and transformers 5.25); reserved out of a whole-process budget.
CHECK_BYTES = 200 * 1024**2


class DeferredChecks:
    def __init__(self, checks: list[Callable[[], None]]):
        self.checks = list(checks)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def resident_bytes(self) -> int:
        """Memory the checks will hold while they run (none without checks)."""
        return CHECK_BYTES if self.checks else 0

    def start(self) -> None:
        """Start the checks on their thread (once; later calls do nothing)."""
        with self._lock:
            if self.thread is not None or not self.checks:
                return
            # a daemon: a run that fails or is interrupted does not wait for an import it no longer needs
            self.thread = threading.Thread(target=self._run, name="composer-checks", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            for check in self.checks:
                check()
        except BaseException as error:  # noqa: BLE001  (handed to the thread that waits, which raises it)
            self.error = error

    def wait(self) -> None:
        """Start the checks if they have not started, wait for them, and raise what a failing one raised."""
        self.start()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
