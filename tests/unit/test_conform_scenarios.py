"""The conformance library is well-formed and its deviations are documented (no KVM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostemu.conform.deviations import DEVIATIONS, Deviation
from hostemu.conform.run import DEVIATION, DIFFERENT, KNOWN_BUG, SAME, verdict
from hostemu.conform.scenarios import SCENARIOS, irqfd

DOC = Path(__file__).parents[2] / "docs" / "semantics.md"


def test_library_size_and_names() -> None:
    assert len(SCENARIOS) >= 50
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


def test_citations_name_known_deviations() -> None:
    cited = {st.deviation for s in SCENARIOS for st in s.steps if st.deviation}
    assert cited <= set(DEVIATIONS)


def test_every_deviation_is_in_the_docs() -> None:
    text = DOC.read_text()
    for name in DEVIATIONS:
        assert f"`{name}`" in text, f"docs/semantics.md does not describe {name}"


def test_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = irqfd("e", 5)
    a, b = {"result": "ok"}, {"result": "EINVAL"}
    assert verdict(plain, a, a)[0] == SAME
    assert verdict(plain, a, b)[0] == DIFFERENT
    assert verdict(plain.dev("resample-self"), a, b)[0] == DEVIATION
    monkeypatch.setitem(DEVIATIONS, "some-bug", Deviation("some-bug", "bug", "not fixed yet"))
    assert verdict(plain.dev("some-bug"), a, b)[0] == KNOWN_BUG
    assert "no difference" in verdict(plain.dev("vm-id"), a, a)[1]
    with pytest.raises(KeyError):
        verdict(plain.dev("no-such-deviation"), a, b)
