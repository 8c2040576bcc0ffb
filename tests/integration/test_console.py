"""The console device: guest text in, safe host lines out.

The line assembler and sanitizer are pure and tested directly; the rest runs real
processes (broker, VMM, guest, console device) from ``examples/minimal.toml`` through
:mod:`hostemu.topology`, and checks what the device received through its ``stats``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostemu import topology
from hostemu.devices.console import MAX_CHAIN, MAX_LINE, LineAssembler, sanitize
from shared.wire import Policy
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import run_vmm, run_vmm_lines

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ---------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text\twith tab", "plain text\twith tab"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # ANSI colour: no escape reaches a tty
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC retitle + BEL
        ("8-bit \x9b2J", "8-bit \\x9b2J"),  # C1 CSI: clears the screen on some terminals
        ("back\x08\x7fspace", "back\\x08\\x7fspace"),
        ("a\rb", "a\\x0db"),
        ("bidi \u202eevil", "bidi \\u202eevil"),
        ("héllo ✓", "héllo ✓"),
    ],
)
def test_sanitize_escapes_control_characters(text: str, shown: str) -> None:
    assert sanitize(text) == shown


def test_assembler_joins_lines_across_buffers_and_keeps_the_partial() -> None:
    a = LineAssembler()
    assert a.feed(b"hel") == []
    assert a.pending == 3
    assert a.feed(b"lo\nwor") == [("hello", False)]
    assert a.feed(b"ld\r\n\n") == [("world", False), ("", False)]
    assert a.pending == 0


def test_assembler_truncates_long_lines_and_bounds_the_partial() -> None:
    a = LineAssembler(max_line=8)
    assert a.feed(b"0123456789") == []
    assert a.pending == 8  # the rest was discarded, not buffered
    assert a.feed(b"abc\nok\n") == [("01234567", True), ("ok", False)]
    assert a.truncated_bytes == 5


def test_assembler_ends_the_line_at_a_cut_buffer() -> None:
    a = LineAssembler()
    assert a.feed(b"start of a huge buf", cut=True) == [("start of a huge buf", True)]
    assert a.feed(b"next\n") == [("next", False)]


def test_assembler_replaces_invalid_utf8() -> None:
    a = LineAssembler(max_line=4)
    # a truncation through a multi-byte character, and bytes that are not UTF-8 at all
    assert a.feed("abc✓\n".encode() + b"\xff\xfe\n") == [
        ("abc\ufffd", True),
        ("\ufffd\ufffd", False),
    ]


# ---------------------------------------------------------------------------- processes


def minimal_spec(**params: Any) -> list[dict[str, Any]]:
    """``examples/minimal.toml`` as the VMM's spec, with workload ``params`` merged in."""
    doc = topology.to_vmm_spec(topology.load(EXAMPLES / "minimal.toml"))
    assert doc["switches"] == []
    specs: list[dict[str, Any]] = doc["vms"]
    if params:
        argv = specs[0]["workload"]
        argv[argv.index("--params") + 1] = json.dumps(params)
    return specs


def console_stats(result: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = result["stats"]["vm0"]["devices"]["console0"]["model"]
    return stats


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name.lower())
def test_boot_lines_reach_the_host(broker_factory, policy: Policy) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory(policy=policy)
    result = run_vmm(broker, minimal_spec())
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["lines"] == 3 and r["error"] is None, r
    stats = console_stats(result)
    assert stats["recent"] == ["vbusemu guest booting", "pci: 1 function", "console: ready"]
    assert stats["lines"] == 3 and stats["truncated"] == 0 and stats["pending"] == 0
    assert stats["bytes"] == sum(len(line) + 1 for line in stats["recent"])
    assert result["errors"] == []
    assert not broker.connect().state()["objects"]


def test_hostile_text_is_bounded_and_escaped(broker: BrokerHandle) -> None:
    lines = ["\x1b[2J\x1b[Hpwned", "x" * (MAX_LINE + 904), "ünïcödé ✓ " * 20, "tab\there"]
    # 16-byte buffers: every line spans buffers; a 4-entry queue: write() must wait for
    # the device to return buffers (back-pressure) many times.
    result = run_vmm(broker, minimal_spec(lines=lines, buf_size=16, qsize=4))
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["lines"] == 4, r
    assert r["console"]["waits"] > 0  # the small queue really filled up
    stats = console_stats(result)
    assert stats["recent"] == ["\\x1b[2J\\x1b[Hpwned", "x" * MAX_LINE, lines[2], lines[3]]
    assert stats["lines"] == 4 and stats["truncated"] == 1
    assert stats["truncated_bytes"] == 904 and stats["dropped_bytes"] == 0
    assert stats["bytes"] == sum(len(line.encode()) + 1 for line in lines)


def test_oversized_buffers_are_cut_and_counted(broker: BrokerHandle) -> None:
    # one 20001-byte buffer per line: the device reads MAX_CHAIN bytes of it, no more
    result = run_vmm(broker, minimal_spec(lines=["y" * 20000, "after"], buf_size=20001, qsize=2))
    assert result["returncode"] == 0, result
    stats = console_stats(result)
    assert stats["recent"] == ["y" * MAX_LINE, "after"]
    assert stats["truncated"] == 1 and stats["pending"] == 0
    assert stats["dropped_bytes"] == 20001 - MAX_CHAIN
    assert stats["bytes"] == 20001 + 6


def run_vmm_output(
    broker: BrokerHandle, vms: list[dict[str, Any]], timeout: float = 60
) -> list[dict[str, Any]]:
    """Every JSON line the VMM printed (``run_vmm`` keeps only the final one)."""
    return run_vmm_lines(broker, vms, timeout)[1]


def test_console_lines_are_forwarded_upstream(broker: BrokerHandle) -> None:
    lines = run_vmm_output(broker, minimal_spec(lines=["one", "two \x1b[1m"]))
    assert lines and lines[-1]["event"] == "vmm_done", lines
    assert lines[-1]["results"]["vm0"]["ok"], lines[-1]
    console = [
        (o["vm"], o["device"], o["text"], o["truncated"])
        for o in lines
        if o.get("event") == "guest_event" and o.get("name") == "console"
    ]
    assert console == [
        ("vm0", "vm0/console0", "one", False),
        ("vm0", "vm0/console0", "two \\x1b[1m", False),
    ]


def test_many_lines_arrive_upstream_in_order(broker: BrokerHandle) -> None:
    sent = [f"{i:04d} " + "x" * 300 for i in range(300)]  # ~90 KiB: more than one pipe read
    lines = run_vmm_output(broker, minimal_spec(lines=sent))
    assert lines[-1]["event"] == "vmm_done" and lines[-1]["results"]["vm0"]["ok"], lines[-1]
    got = [
        o["text"] for o in lines if o.get("event") == "guest_event" and o.get("name") == "console"
    ]
    assert got == sent
    assert console_stats(lines[-1])["lines"] == len(sent)
