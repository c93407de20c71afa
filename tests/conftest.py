"""Test-session hooks: fsyncbn's process-wide state reset between tests, the fault-injection
summary.

A fault test appends its row to ``FAULTS`` in the process that runs it; the row travels on the
test's report (``user_properties``), so the summary is complete whether the tests ran here or in
pytest-xdist's worker processes.
"""

from __future__ import annotations

import pytest

from tests._support.faultlog import FAULTS

_SUMMARY: list[tuple[str, str, str, float]] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    if call.when == "call":
        report.user_properties += [("fault", tuple(row)) for row in FAULTS]
        FAULTS.clear()
    return report


def pytest_runtest_logreport(report) -> None:  # type: ignore[no-untyped-def]
    _SUMMARY.extend(tuple(value) for name, value in report.user_properties if name == "fault")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection summary")
    widths = [max(len(row[i]) for row in _SUMMARY) + 2 for i in range(3)]
    s, p, o = (max(w, len(h) + 2) for w, h in zip(widths, ("scenario", "path", "outcome"), strict=True))
    write(f"{'scenario':<{s}}{'path':<{p}}{'outcome':<{o}}{'seconds':>8}")
    for scenario, path, outcome, seconds in sorted(_SUMMARY):
        write(f"{scenario:<{s}}{path:<{p}}{outcome:<{o}}{seconds:>8.2f}")


@pytest.fixture(autouse=True)
def reset_process_wide_state():
    """Every test starts from fsyncbn's process-wide state as imported (the list is in
    docs/architecture.md, "Process-wide state"); the weak registries empty themselves."""
    from fsyncbn import conversions, eps_mode, reducers, step_journal
    from fsyncbn.functional.paths import cuda_sync

    tables = (conversions._BY_PLAIN, conversions._BY_SYNC, conversions._ANY_RANK)
    saved = [table.copy() for table in tables]
    yield
    eps_mode.set_sbn_eps_mode("plus")
    for table, copy in zip(tables, saved, strict=True):
        table.clear()
        table.update(copy)
    cuda_sync._failed.clear()
    cuda_sync._compiled.clear()
    with step_journal._journals_lock:
        step_journal._journals.clear()
    with reducers._tag_lock:
        reducers._next_tag.clear()
