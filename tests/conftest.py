"""Test-session hooks: the fault-injection summary."""

from __future__ import annotations

from tests.faultlog import FAULTS


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not FAULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection summary")
    write(f"{'scenario':<30}{'path':<20}{'outcome':<48}{'seconds':>8}")
    for scenario, path, outcome, seconds in sorted(FAULTS):
        write(f"{scenario:<30}{path:<20}{outcome:<48}{seconds:>8.2f}")
