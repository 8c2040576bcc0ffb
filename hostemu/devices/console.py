"""``console``: the guest's text console -- bytes the guest writes become host log lines.

One queue, TX (queue 0): device-readable buffers of UTF-8 text from the guest. The device
copies each chain's readable bytes out, completes the chain at once (used len 0: nothing
is written back), and cuts the byte stream into lines at ``\\n``. A line may span buffers
and kicks: the bytes after the last newline wait, bounded, until their newline arrives.
Each complete line is delivered to the host as a ``console`` event on the device
process's stdout (``{"event": "console", "text": ..., "truncated": ...}``); the VMM reads
it there and forwards it upstream. The last :data:`RECENT_LINES` lines are also kept for
``stats`` (a dmesg-like tail, for post-mortems and tests).

Trust
-----
Everything the guest writes is untrusted and is made safe *before* it leaves the device:

* **Size.** A line keeps at most :data:`MAX_LINE` bytes; the rest, up to its newline, is
  discarded and the line is flagged ``truncated`` (and counted). At most :data:`MAX_CHAIN`
  bytes are read from one chain (a guest may post 16 MiB buffers; a pass must not copy
  256 of them); the excess is discarded and counted in ``dropped_bytes``, and the line in
  progress ends at the cut (flagged ``truncated``). So memory per pass is bounded by
  ``BUDGET * MAX_CHAIN`` and the pending partial line by ``MAX_LINE``.
* **Encoding.** Lines are cut on bytes (``\\n`` never occurs inside a UTF-8 sequence), then
  decoded with ``errors="replace"``; a sequence cut by truncation becomes U+FFFD.
* **Terminal injection.** Every control character other than tab -- C0, DEL, C1 (which
  includes the 8-bit CSI ``U+009B``) -- and the Unicode line/paragraph separators and
  bidirectional overrides are replaced by a visible ``\\xNN`` / ``\\uNNNN`` escape, so a
  host printing the text cannot be made to move the cursor, recolour, retitle or reorder
  it. A trailing ``\\r`` (CRLF line ends) is dropped rather than escaped.

Invariants
----------
* Every chain popped is completed in the same pass (the console never holds guest
  buffers), so the guest driver's ``Console.flush`` can wait for ``in_flight == 0``.
* An unterminated last line is held (``pending`` bytes in ``stats``), never emitted
  half-way: a line is delivered once, complete.
* A line's ``console`` event is written before the chain that completed it is returned to
  the guest: once the guest sees its buffer come back, the line is in the pipe.
* ``bytes`` counts every readable byte the guest sent; each is either in an emitted line,
  in the pending partial line, a discarded newline/CR, cut by truncation
  (``truncated_bytes``) or beyond ``MAX_CHAIN`` (``dropped_bytes``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import numpy as np

from hostemu.devices.runtime import BUDGET, DeviceModel, Queue, no_params
from shared import pci_layout as pl

TX: Final = 0
MAX_LINE: Final = 4096
"""Bytes of one line kept; longer lines are cut and flagged ``truncated``."""
MAX_CHAIN: Final = 16 * 1024
"""Bytes read from one chain; the rest is dropped (bounds a pass to BUDGET * 16 KiB)."""
RECENT_LINES: Final = 32
"""Lines kept for ``stats`` (a tail, like dmesg)."""


def _escape_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        if cp != 0x09:  # tab is harmless text
            table[cp] = f"\\x{cp:02x}"
    # Line/paragraph separators (a line must stay one line) and the bidi embeddings,
    # overrides and isolates (which can make a log line display differently from its bytes).
    for cp in [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]:
        table[cp] = f"\\u{cp:04x}"
    return table


_ESCAPES: Final = _escape_table()


def sanitize(text: str) -> str:
    """``text`` with every control character but tab replaced by a visible escape."""
    return text.translate(_ESCAPES)


class LineAssembler:
    """Cuts an untrusted byte stream into bounded, sanitized lines (pure; no I/O).

    ``feed`` returns the lines the bytes completed, as ``(text, truncated)``. The partial
    line after the last newline is kept, at most :data:`MAX_LINE` bytes of it.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = bytearray()
        self._cut = False  # the pending line already lost bytes
        self.truncated_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes of the current, unterminated line held."""
        return len(self._partial)

    def _append(self, piece: bytes) -> None:
        room = self.max_line - len(self._partial)  # >= 0: the partial never exceeds it
        if len(piece) > room:
            self._cut = True
            self.truncated_bytes += len(piece) - room
            piece = piece[:room]
        self._partial += piece

    def feed(self, data: bytes, *, cut: bool = False) -> list[tuple[str, bool]]:
        """The lines ``data`` completes. ``cut``: bytes after ``data`` were dropped (an
        oversized buffer); the line in progress ends there, flagged truncated, so the
        next buffer starts a fresh line instead of vanishing into a cut one."""
        pieces = data.split(b"\n")
        lines: list[tuple[str, bool]] = []
        for piece in pieces[:-1]:  # each of these ends at a newline
            self._append(piece)
            lines.append(self._finish())
        self._append(pieces[-1])
        if cut:
            self._cut = True
            lines.append(self._finish())
        return lines

    def _finish(self) -> tuple[str, bool]:
        raw = bytes(self._partial)
        if raw.endswith(b"\r") and not self._cut:
            raw = raw[:-1]  # CRLF: the CR is line-ending noise, not content to escape
        line = (sanitize(raw.decode("utf-8", errors="replace")), self._cut)
        self._partial.clear()
        self._cut = False
        return line


class ConsoleModel(DeviceModel):
    name = "console"

    def __init__(self) -> None:
        self.assembler = LineAssembler()
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.lines = 0
        self.bytes = 0
        self.truncated = 0
        self.dropped_bytes = 0

    def on_queue(self, q: Queue) -> bool:
        if q.index != TX:
            return False
        q.ring.disable_notifications()
        batch = q.ring.pop_batch(max_n=BUDGET)
        if len(batch) == 0:
            return q.ring.enable_notifications()  # re-check: no lost kick
        readable = batch.readable_lens
        width = int(min(MAX_CHAIN, max(1, int(readable.max()))))
        data, copied = q.ring.read_payloads(batch, width)
        if q.ring.broken:
            return False  # the runtime reports it; nothing may be completed now
        self.bytes += int(readable.sum())
        self.dropped_bytes += int((readable - copied).sum())
        # Lines first, completion second: when the guest sees its buffer back, the line
        # is already on its way to the host (see the module invariants).
        for row, n, want in zip(data, copied.tolist(), readable.tolist(), strict=True):
            for text, cut in self.assembler.feed(row[:n].tobytes(), cut=n < want):
                self._deliver(text, cut)
        self.runtime.complete(q, batch.heads, np.zeros(len(batch), dtype=np.uint32))
        return True

    def _deliver(self, text: str, truncated: bool) -> None:
        self.lines += 1
        self.truncated += truncated
        self.recent.append(text)
        self.runtime.emit("console", text=text, truncated=truncated)

    def stats(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "bytes": self.bytes,
            "truncated": self.truncated,
            "truncated_bytes": self.assembler.truncated_bytes,
            "dropped_bytes": self.dropped_bytes,
            "pending": self.assembler.pending,
            "recent": list(self.recent),
        }


DEVICE_ID = pl.DEVICE_CONSOLE
QUEUES = 1
VECTORS = 1


def check_params(params: dict[str, Any]) -> None:
    """Checked by the topology before anything starts: no options."""
    no_params("console", params)


def make_model(params: dict[str, Any]) -> DeviceModel:
    check_params(params)
    return ConsoleModel()
