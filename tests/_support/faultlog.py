"""What the fault-injection tests saw: scenario, path, outcome, seconds to the error."""

from __future__ import annotations

FAULTS: list[tuple[str, str, str, float]] = []


def record_fault(scenario: str, path: str, outcome: str, seconds: float) -> None:
    FAULTS.append((scenario, path, outcome, seconds))
