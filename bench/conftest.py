"""`pytest bench/`: collects every benchmark's `extra_info`, prints one table per benchmark and, with
`--save-results`, writes `bench/results/<date>-<device>.{json,md,png}` through `bench.report`."""

import datetime
import importlib.metadata
import os
import platform
import sys

import pytest
import torch

from bench import report
from bench.harness import device_name

RESULTS = []
BASELINE_DISTRIBUTIONS = ("triton", "transformers", "liger-kernel", "trl", "cut-cross-entropy")
"""Versions recorded with the results (None where not installed)."""


def pytest_addoption(parser):
    parser.addoption("--save-results", action="store_true",
                     help="write bench/results/<date>-<device>.{json,md,png}")


@pytest.fixture
def record(request):
    """record(**fields): one result row for this test (also stored in the benchmark's extra_info)."""

    def _record(benchmark=None, **fields):
        row = {"test": request.node.name, **fields}
        if benchmark is not None:
            benchmark.extra_info.update(fields)
            row["_benchmark"] = benchmark
        RESULTS.append(row)

    return _record


def _finalize(row):
    bench = row.pop("_benchmark", None)
    stats = getattr(bench, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        row["median_ms"] = stats.stats.median * 1e3
    return row


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    rows = [_finalize(dict(r)) for r in RESULTS]
    terminalreporter.write_sep("=", f"fastpo benchmarks on {device_name()}")
    terminalreporter.write(report.markdown(rows))
    if config.getoption("--save-results"):
        for path in _save(rows):
            terminalreporter.write_line(f"wrote {path}")


def _save(rows):
    meta = {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **{name: _version(name) for name in BASELINE_DISTRIBUTIONS},
        "python": platform.python_version(),
        "command": " ".join(["python -m pytest", *sys.argv[1:]]),
    }
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{meta['date']}-{meta['device'].replace(' ', '_')}")
    return report.write(meta, rows, stem)


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
