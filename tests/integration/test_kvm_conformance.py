"""The broker next to the real KVM: every scenario, step by step.

A difference fails the test unless the step cites a documented deliberate deviation;
a step citing an open bug is expected to differ (strict xfail: when the bug is fixed the
citation must go). Skips, with the reason, where /dev/kvm is missing or unusable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostemu import kvm as K
from hostemu.conform.deviations import DEVIATIONS
from hostemu.conform.run import DIFFERENT, KNOWN_BUG, SAME, Conformance
from hostemu.conform.scenarios import SCENARIOS, Scenario

WHY = K.unusable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"KVM unusable here: {WHY}")


@pytest.fixture(scope="module")
def conformance() -> Iterator[Conformance]:
    with Conformance() as c:
        yield c


@pytest.fixture(autouse=True)
def leak_guard() -> None:
    """The module-scoped brokers outlive single tests; the suite-wide fd/child guard would
    count them as leaks. Each scenario's own fds are closed by its backends."""


def _params() -> list[object]:
    out: list[object] = []
    for s in SCENARIOS:
        bug = any(st.deviation and DEVIATIONS[st.deviation].kind == "bug" for st in s.steps)
        marks = [pytest.mark.xfail(strict=True, reason="cites an open bug")] if bug else []
        out.append(pytest.param(s, id=s.name, marks=marks))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", _params())
def test_scenario_matches_kvm(conformance: Conformance, scenario: Scenario) -> None:
    result = conformance.run(scenario)
    problems = []
    for s in result.steps:
        where = f"#{s.index} {s.step.describe()}"
        if s.verdict == DIFFERENT:
            problems.append(f"{where}: vbusemu {s.broker} != kernel {s.kernel}")
        elif s.verdict == SAME and s.step.deviation:
            problems.append(f"{where}: cites {s.step.deviation} but shows no difference")
        elif s.verdict == KNOWN_BUG:
            problems.append(f"{where}: open bug {s.step.deviation}")
    assert not problems, "\n".join(problems)
