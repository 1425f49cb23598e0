"""Streaming text out of tokens: UTF-8 that a token splits is held back, and so is text that
could be the start of a stop string, so a stream never shows a stop string or half a character."""

from __future__ import annotations


class TextStream:
    """Bytes of tokens -> text, holding back incomplete UTF-8 and possible stop-string prefixes."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = b""
        self.text = ""  # all text released so far
        self.held = ""  # decoded text not yet released (could start a stop string)
        self.stopped = False

    def feed(self, data: bytes) -> str:
        self.pending += data
        try:
            new = self.pending.decode("utf-8")
            self.pending = b""
        except UnicodeDecodeError as e:  # keep a split multi-byte character for later
            if e.start < len(self.pending) - 3:
                new, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            else:
                new, self.pending = self.pending[: e.start].decode("utf-8"), self.pending[e.start :]
        buf = self.held + new
        for s in self.stop:
            i = buf.find(s)
            if i >= 0:
                self.stopped, self.held = True, ""
                return self._release(buf[:i])
        keep = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - keep :] if keep else ""
        return self._release(buf[: len(buf) - keep])

    def flush(self) -> str:
        out = self.held + self.pending.decode("utf-8", errors="replace")
        self.held, self.pending = "", b""
        return self._release(out)

    def _release(self, s: str) -> str:
        self.text += s
        return s
