"""`pytest bench/`: collects every benchmark's `extra_info` and, with `--save-results`, writes
`bench/results/<date>-<device>.json` and a Markdown table beside it."""

import datetime
import json
import os
import platform
import sys

import pytest
import torch

from bench.harness import device_name

RESULTS = []


def pytest_addoption(parser):
    parser.addoption("--save-results", action="store_true", help="write bench/results/<date>-<device>.{json,md}")


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
    terminalreporter.write(_markdown(rows))
    if config.getoption("--save-results"):
        _save(rows)


def _save(rows):
    meta = {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "command": " ".join(["python -m pytest", *sys.argv[1:]]),
    }
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{meta['date']}-{meta['device'].replace(' ', '_')}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(f"# fastpo benchmarks: {meta['device']}\n\n")
        f.write("".join(f"- {k}: `{v}`\n" for k, v in meta.items()) + "\n")
        f.write(_markdown(rows))


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def _columns(rows):
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _markdown(rows):
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
