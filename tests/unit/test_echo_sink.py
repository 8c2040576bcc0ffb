"""The echo device's ``sink`` mode (the far end of a one-way guest -> host stream) on a real
ring in process memory, with a fake runtime recording completions: every frame is
consumed and completed, frames out of sequence or too short to carry one are counted, on
the scalar (few chains) and the vectorized (many chains) path alike."""

from __future__ import annotations

from typing import Any

import pytest

from hostemu.devices import echo as echo_module
from hostemu.devices.echo import TX, EchoModel, make_model
from hostemu.devices.runtime import Queue
from shared.errors import ConfigError
from tests.unit.test_ring import RING_A, Pair, make_memory

BUF = 0x40000  # guest-physical address of the frame buffers
SIZE = 64


class FakeRuntime:
    """What EchoModel uses of DeviceRuntime: its queues and ``complete``."""

    def __init__(self, q: Queue) -> None:
        self.queues = {TX: q}
        self.busy_poll: dict[int, int] = {}
        self.completed: list[tuple[list[int], list[int]]] = []

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        ids_l = ids if isinstance(ids, list) else ids.tolist()
        lens_l = lens if isinstance(lens, list) else lens.tolist()
        self.completed.append((ids_l, lens_l))
        q.ring.push_used(ids_l, lens_l)

    def used_published(self, q: Queue, interrupt: bool) -> None:
        """The compiled path's fused pass published the used entries itself."""
        self.completed.append(([], []))

    def schedule(self, index: int) -> None:  # pragma: no cover - sink mode never schedules
        raise AssertionError("sink mode does not schedule queues")


def setup(qsize: int = 128) -> tuple[Pair, EchoModel, FakeRuntime, Queue]:
    mem, _ = make_memory()
    pair = Pair(mem, RING_A, qsize)
    q = Queue(TX, pair.device, vector=0)
    model = EchoModel(sink=True)
    runtime = FakeRuntime(q)
    model.runtime = runtime  # type: ignore[assignment]
    return pair, model, runtime, q


def post(pair: Pair, seqs: list[int], size: int = SIZE) -> None:
    addrs = [BUF + i * SIZE for i in range(len(seqs))]
    for addr, seq in zip(addrs, seqs, strict=True):
        frame = (seq & 0xFFFFFFFF).to_bytes(4, "little") + bytes([seq & 0xFF]) * (SIZE - 4)
        pair.mem.write(addr, frame[:size])
    pair.driver.add_batch(addrs, [size] * len(seqs), False)


@pytest.mark.parametrize("n", [1, 3, 40], ids=["one", "scalar", "vector"])
def test_sink_consumes_and_completes_in_sequence(n: int) -> None:
    pair, model, runtime, q = setup()
    post(pair, list(range(n)))
    assert model.on_queue(q)
    assert len(runtime.completed) == 1 and q.ring.in_flight == 0 and q.ring.next_used == n
    post(pair, list(range(n, 2 * n)))
    model.on_queue(q)
    assert model.stats()["sunk"] == 2 * n and model.stats()["seq_errors"] == 0
    assert model.stats()["bytes"] == 2 * n * SIZE
    ids, lens = pair.driver.get_used()
    assert len(ids) == 2 * n and not lens.any()  # nothing written back: length 0
    assert pair.device.broken is None


@pytest.mark.parametrize("n", [3, 40], ids=["scalar", "vector"])
def test_sink_counts_frames_out_of_sequence(n: int) -> None:
    pair, model, _, q = setup()
    seqs = list(range(n))
    seqs[1] = 999  # one wrong
    post(pair, seqs)
    model.on_queue(q)
    assert model.stats()["seq_errors"] == 1 and model.stats()["sunk"] == n


@pytest.mark.parametrize("n", [3, 40], ids=["scalar", "vector"])
def test_sink_counts_frames_too_short_for_a_sequence_number(n: int) -> None:
    pair, model, _, q = setup()
    post(pair, list(range(n)), size=3)
    model.on_queue(q)
    assert model.stats()["seq_errors"] == n and model.stats()["sunk"] == n


def test_reset_restarts_the_sequence() -> None:
    pair, model, _, q = setup()
    post(pair, [0, 1])
    model.on_queue(q)
    model.on_reset()
    pair.driver.get_used()
    post(pair, [0, 1])
    model.on_queue(q)
    assert model.stats()["seq_errors"] == 0 and model.stats()["sunk"] == 4


def test_an_empty_ring_reenables_notifications() -> None:
    pair, model, _, q = setup()
    assert not model.on_queue(q)
    assert pair.device.notifications_enabled


@pytest.mark.parametrize("params", [{"sink": 1}, {"sink": "yes"}, {"sink": None}])
def test_bad_sink_option_is_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="sink"):
        make_model(params)


def test_sink_option_is_off_by_default() -> None:
    model = make_model({})
    assert isinstance(model, EchoModel) and not model.sink
    assert "sunk" not in model.stats()


def test_a_big_batch_is_read_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many big buffers the guest posts, the device's copy buffer stays within
    MAX_PASS_BYTES (one frame at the least): 40 frames read 4 at a time here."""
    monkeypatch.setattr(echo_module, "MAX_PASS_BYTES", 4 * SIZE)
    pair, model, runtime, q = setup()
    seqs = list(range(40))
    seqs[9] = 7  # one wrong, in the third piece
    post(pair, seqs)
    assert model.on_queue(q)
    assert model.stats()["sunk"] == 40 and model.stats()["seq_errors"] == 1
    assert model._sink_mem.nbytes <= 4 * SIZE
    assert len(runtime.completed) == 1  # completed at once ...
    ids, _ = pair.driver.get_used()
    assert ids.tolist() == list(range(40))  # ... in order (a fresh ring posts heads 0, 1, ...)
