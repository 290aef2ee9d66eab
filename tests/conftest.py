"""Suite-wide rules.

A skipped test is not a passing test: with NODEMESH_FAIL_ON_SKIP=1 (set by
scripts/test.sh, so in CI) any skip turns the run red. Tests that need root
carry the ``root`` marker or live in tests/integration/; they are skipped only for a developer running
pytest by hand without root.
"""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (netns, cgroups, eBPF)")
    for item in items:
        if "root" in item.keywords or f"{os.sep}integration{os.sep}" in str(item.fspath):
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("NODEMESH_FAIL_ON_SKIP") == "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped and os.environ.get("NODEMESH_FAIL_ON_SKIP") == "1":
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) skipped; a skipped test is not a passing test:",
            red=True,
        )
        for nodeid in _skipped:
            terminalreporter.write_line(f"  skipped: {nodeid}", red=True)
