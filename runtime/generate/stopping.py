"""Stop strings on streamed text: hold back what may be the start of a stop string, cut at a match."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    stops: tuple[str, ...] = ()
    _pending: str = field(default="", init=False)
    stopped: bool = field(default=False, init=False)

    def __post_init__(self):
        self.stops = tuple(s for s in self.stops if s)

    def feed(self, text: str) -> str:
        """Add newly decoded text; return the part that is safe to emit now."""
        if self.stopped:
            return ""
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        hold = self._held_suffix(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """End of generation: whatever was held back is plain text."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
