"""Test-session hooks: the fault-injection summary."""

from __future__ import annotations

from tests._support.faultlog import FAULTS


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not FAULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection summary")
    widths = [max(len(row[i]) for row in FAULTS) + 2 for i in range(3)]
    s, p, o = (max(w, len(h) + 2) for w, h in zip(widths, ("scenario", "path", "outcome"), strict=True))
    write(f"{'scenario':<{s}}{'path':<{p}}{'outcome':<{o}}{'seconds':>8}")
    for scenario, path, outcome, seconds in sorted(FAULTS):
        write(f"{scenario:<{s}}{path:<{p}}{outcome:<{o}}{seconds:>8.2f}")
