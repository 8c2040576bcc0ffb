"""The conformance library is well-formed and its deviations are documented (no KVM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostemu.conform.backends import INJECT_PATIENT, INJECT_QUIET
from hostemu.conform.deviations import DEVIATIONS, Deviation
from hostemu.conform.run import (
    DEVIATION,
    DIFFERENT,
    KNOWN_BUG,
    SAME,
    Conformance,
    ScenarioResult,
    StepResult,
    format_table,
    verdict,
)
from hostemu.conform.scenarios import BY_NAME, SCENARIOS, Scenario, irqfd, take

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


def test_take_steps_run_while_vm_a_and_its_guest_live() -> None:
    """A take is VM a's guest taking interrupts: not after VM a's teardown."""
    for s in SCENARIOS:
        gone = False
        for st in s.steps:
            gone = gone or (st.op == "teardown" and st.args["vm"] == "a")
            assert not (gone and st.op == "take"), f"{s.name}: take after VM a's teardown"


def test_resample_is_compared_with_the_guest_taking_interrupts() -> None:
    """RESAMPLE scenarios reach the EOI, and none of them cites a deviation."""
    resample = [s for s in SCENARIOS if any(st.args.get("resample") for st in s.steps)]
    assert sum(any(st.op == "take" for st in s.steps) for s in resample) >= 10
    cited = {st.deviation for s in resample for st in s.steps if st.deviation}
    assert cited == {"resample-self"}


def test_table_shows_taken_and_asserted_lines() -> None:
    result = ScenarioResult(BY_NAME["irqfd-resample-eoi"])
    obs = {"result": "ok", "took": [5, 9], "asserted": [7], "counters": {"r": 1}}
    result.steps.append(StepResult(5, take(), obs, obs, SAME))
    row = format_table([result]).splitlines()[-1]
    assert "ok | took 5,9 | asserted 7 | r=1" in row and row.rstrip().endswith("same")


@pytest.mark.parametrize(
    ("quick", "patient", "runs"),
    [
        (SAME, SAME, [INJECT_QUIET]),
        (DIFFERENT, SAME, [INJECT_QUIET, INJECT_PATIENT]),
        (DIFFERENT, DIFFERENT, [INJECT_QUIET, INJECT_PATIENT]),
    ],
)
def test_an_unexpected_difference_is_confirmed_by_a_patient_run(
    monkeypatch: pytest.MonkeyPatch, quick: str, patient: str, runs: list[float]
) -> None:
    """A scenario whose quick run shows a difference nobody expected runs again, watching
    steps that raise nothing for longer; that run is the answer (an injection that came
    late on a loaded machine is not a difference). An expected result is not repeated."""
    scenario = BY_NAME["irqfd-resample-close-resamplefd"]
    seen: list[float] = []

    def run(self: Conformance, s: Scenario, quiet: float) -> ScenarioResult:
        seen.append(quiet)
        late = quiet == INJECT_QUIET and quick == DIFFERENT
        r = ScenarioResult(s)
        r.steps.append(
            StepResult(
                1,
                s.steps[-1],
                {"injected": [] if late else [9]},
                {"injected": [9]},
                quick if quiet == INJECT_QUIET else patient,
            )
        )
        return r

    monkeypatch.setattr(Conformance, "_run", run)
    result = Conformance.__new__(Conformance).run(scenario)  # (no KVM: _run is faked)
    assert seen == runs
    assert [s.verdict for s in result.steps] == [patient if len(runs) > 1 else quick]
    assert INJECT_PATIENT > INJECT_QUIET
