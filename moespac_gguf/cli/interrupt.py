"""Ctrl-C for the commands that run a model (`run`, `chat`): the text so far, then exit 130."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupt:
    """Ctrl-C for a command that runs a model: the text so far, then exit code 130, no traceback.

    Python's KeyboardInterrupt cannot stop llama.cpp: SIGINT lands, most of the time, while
    llama.cpp calls back into Python (its log while loading, the routing capture while decoding,
    through ctypes), where ctypes prints the exception with a traceback, swallows it, and the
    work goes on (a generation to its end). So SIGINT only sets `requested`: the generation's
    `cancel` reads it after every token, the command checks it after loading. A second one ends
    the process at once (the default action: a long load or prompt not yet done). Within
    `raising()` (waiting for input, where no callback runs) it raises KeyboardInterrupt instead.
    Installed only in the main thread, over Python's own handler (not where SIGINT is ignored,
    as in a background job).
    """

    def __init__(self) -> None:
        self.requested = False
        self._raise = False
        self._previous = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        again, self.requested = self.requested, True
        if self._raise:
            raise KeyboardInterrupt
        if again:  # the first did not stop it soon enough: the default action, now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    def cancelled(self) -> bool:
        return self.requested

    @contextmanager
    def raising(self) -> Iterator[None]:
        """SIGINT raises KeyboardInterrupt in this block (a blocking wait outside llama.cpp)."""
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


def interrupted(command: str) -> int:
    print(f"moespac {command}: interrupted", file=sys.stderr, flush=True)
    return 130
