"""One generation at a time on one MoeSpac, in arrival order: what a desktop app that calls it
from several threads needs (llama.cpp's contexts hold one sequence, and speculative decoding
rolls its KV cache back)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from ..core.errors import MoespacError


class Turns:
    """A first-come first-served lock. A thread that asks for a turn while it holds one (a stream
    of this instance still open in the loop that asks) gets a MoespacError instead of a deadlock;
    a thread interrupted while waiting gives its place up."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._waiting: deque[object] = deque()
        self._owner: int | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextmanager
    def turn(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                raise MoespacError(
                    "this MoeSpac is already generating for this thread (a stream that is still open): "
                    "read it to the end or close() it first"
                )
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._owner is not None or self._waiting[0] is not ticket:
                    self._cv.wait()
            except BaseException:
                self._waiting.remove(ticket)
                self._cv.notify_all()
                raise
            self._waiting.popleft()
            self._owner = me
        try:
            yield
        finally:
            with self._cv:
                self._owner = None
                self._cv.notify_all()
