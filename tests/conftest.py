"""Shared test configuration.

* Hypothesis: no deadline (kernels compile and the machine is shared), and a
  derandomized "ci" profile, loaded when CI is set, so CI never flakes.
* The repository root goes on sys.path so tests can import ``examples.*``.
* With MSDA_FILE_TIMES=1 (CI sets it), the summary lists the time spent in
  each test file, slowest first: each issue's tests have a CI time budget.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

from hypothesis import HealthCheck, settings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


_file_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    # setup + call + teardown, so module fixtures (builds, exports) count for their file.
    _file_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if os.environ.get("MSDA_FILE_TIMES") != "1" or not _file_seconds:
        return
    terminalreporter.write_sep("=", "seconds per test file (MSDA_FILE_TIMES=1)")
    for path, seconds in sorted(_file_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
