"""`pytest bench/`: collects every benchmark's `extra_info`, prints one table per benchmark and, with
`--save-results`, writes `bench/results/<date>-<device>.{json,md,png}` through `bench.report`.

Two depths. The full sweep runs when pytest is pointed at the benchmarks (`pytest bench/`, a file, a `-k`
selection). The smoke pass runs when pytest collects its configured testpaths (a bare `python -m pytest`,
as CI does) or with `--bench-smoke`: every benchmark once, one round without warmup, with neither the
peak-memory probes (a fresh process each) nor the torch.compile providers (a compile each), so that the
default suite stays within CI's time; it shows the benchmarks run, it measures nothing. `--bench-full`
forces the sweep.
"""

import datetime
import importlib.metadata
import os
import platform
import sys

import pytest
import torch

from bench import harness, report
from bench.harness import device_name

RESULTS = []
BASELINE_DISTRIBUTIONS = ("triton", "transformers", "liger-kernel", "trl", "cut-cross-entropy")
"""Versions recorded with the results (None where not installed)."""


def pytest_addoption(parser):
    parser.addoption("--save-results", action="store_true",
                     help="write bench/results/<date>-<device>.{json,md,png}")
    parser.addoption("--bench-smoke", action="store_true",
                     help="benchmarks as a smoke pass (the default when pytest runs its testpaths)")
    parser.addoption("--bench-full", action="store_true", help="the full benchmark sweep, whatever the arguments")


def smoke_pass(config) -> bool:
    """Smoke when pytest runs its configured testpaths (no path or file given), or when asked to."""
    if config.getoption("--bench-full", False):
        return False
    return config.getoption("--bench-smoke", False) or config.args_source == pytest.Config.ArgsSource.TESTPATHS


def pytest_configure(config):
    harness.SMOKE = smoke_pass(config)


def _smoke_skip(item) -> str | None:
    """Why the smoke pass leaves `item` out (None: it runs)."""
    if "peak_memory" in item.name:
        return "smoke pass: the peak-memory probes run in the full sweep (`pytest bench/`)"
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("provider") in getattr(item.module, "COMPILED", ()):
        return "smoke pass: the torch.compile providers run in the full sweep (`pytest bench/`)"
    return None


def pytest_collection_modifyitems(config, items):
    if not harness.SMOKE:
        return
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        reason = _smoke_skip(item) if str(item.path).startswith(bench_dir + os.sep) else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


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
