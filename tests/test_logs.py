"""fastpo.logs.RunLog on real files: one whole line per record in one write, a header per run, a crash's
partial last line dropped, a resume that removes the interrupted lineage's later steps (and nothing of earlier
runs), plots on by default when matplotlib is installed."""

import importlib.util
import json
import os

import pytest

from fastpo import logs
from fastpo.config import from_flat


def _cfg(tmp_path, **flat):
    return from_flat({"logging.out_dir": str(tmp_path), "logging.progress_bar": False, "logging.plots": False,
                      **flat})


def _run(tmp_path, steps, *, resumed_from=None, close=True, config_hash="abc123"):
    """A RunLog that logs a loss at each of `steps`; `close=False` is a run that crashed."""
    log = logs.RunLog(_cfg(tmp_path), 100, enabled=True, config_hash=config_hash, resumed_from=resumed_from)
    for step in steps:
        log.log(step, {"loss": 1.0 / step})
    if close:
        log.close()
    else:
        os.close(log.fd)
    return log


def _steps(records):
    return [r["step"] for r in records if "step" in r]


def test_records_are_whole_lines_and_each_run_has_a_header(tmp_path):
    first, second = _run(tmp_path, [1, 2, 3]), _run(tmp_path, [1, 2])
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    records = logs.read_metrics(str(tmp_path / "metrics.jsonl"))
    headers = [r["run"] for r in records if "run" in r]
    assert [h["id"] for h in headers] == [first.run_id, second.run_id] and first.run_id != second.run_id
    assert all(h["config_hash"] == "abc123" and h["resumed_from"] is None and h["fastpo_version"] for h in headers)
    assert [sorted(r) for r in records] == [["run"], ["loss", "step"], ["loss", "step"], ["loss", "step"], ["run"],
                                            ["loss", "step"], ["loss", "step"]]


def test_one_write_per_record(tmp_path, monkeypatch):
    log = logs.RunLog(_cfg(tmp_path), 10, enabled=True)
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, bytes(data))) or real(fd, data))
    log.log(1, {"loss": 0.5, "rewards/margins": 0.25})
    log.log(2, {})  # an evaluation without eval examples writes nothing
    monkeypatch.undo()
    assert writes == [(log.fd, b'{"step": 1, "loss": 0.5, "rewards/margins": 0.25}\n')]
    log.close()


def test_partial_last_line_is_dropped_on_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # a crash mid-record
    _run(tmp_path, [3], resumed_from=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("step") for line in lines] == [1, 2, None, 3]


def test_resume_logs_each_step_once_and_keeps_earlier_runs(tmp_path):
    """An earlier separate run (steps 1-20); a run checkpointed at 6 and killed at 8; a resume from 6 killed at
    9 before its next checkpoint; a second resume from 6. The lineage logs 1-6 once and 7-10 from the last
    run; the earlier run keeps all its steps."""
    _run(tmp_path, range(1, 21))
    _run(tmp_path, range(1, 9), close=False)
    _run(tmp_path, range(7, 10), resumed_from=6, close=False)
    last = _run(tmp_path, range(7, 11), resumed_from=6)
    records = logs.read_metrics(str(tmp_path / "metrics.jsonl"))
    heads = [i for i, r in enumerate(records) if "run" in r]
    assert len(heads) == 4 and records[heads[-1]]["run"]["id"] == last.run_id
    assert _steps(records[: heads[1]]) == list(range(1, 21))
    assert _steps(records[heads[1]:]) == list(range(1, 11))
    assert [r["run"]["resumed_from"] for r in records if "run" in r] == [None, None, 6, 6]


def test_resume_keeps_a_file_written_without_headers(tmp_path):
    """A file from a run before headers existed is the lineage: its steps after the resumed one go."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    _run(tmp_path, [4, 5], resumed_from=3)
    assert _steps(logs.read_metrics(str(path))) == [1, 2, 3, 4, 5]


NEEDS_MATPLOTLIB = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")


@pytest.mark.parametrize("plots, hide_matplotlib, drawn", [
    pytest.param(None, False, True, id="auto-installed", marks=NEEDS_MATPLOTLIB),  # the default: on with matplotlib
    pytest.param(None, True, False, id="auto-missing"),  # and off without (preflight requires it for plots=true)
    pytest.param(False, False, False, id="off"),
    pytest.param(True, False, True, id="on", marks=NEEDS_MATPLOTLIB),
])
def test_plots_default_to_on_with_matplotlib(tmp_path, monkeypatch, plots, hide_matplotlib, drawn):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if hide_matplotlib and name == "matplotlib" else real(name, *a))
    log = logs.RunLog(_cfg(tmp_path, **{"logging.plots": plots}), 10, enabled=True)
    for step in (1, 2):
        log.log(step, {"loss": 0.7 / step, "rewards/accuracies": 0.5 * step})
    log.close()
    assert (tmp_path / "plots" / "loss.png").exists() == drawn
    assert (tmp_path / "plots" / "rewards_accuracies.png").exists() == drawn


def test_other_ranks_write_nothing(tmp_path):
    log = logs.RunLog(_cfg(tmp_path / "out"), 10, enabled=False)
    log.log(1, {"loss": 0.5})
    log.close()
    assert not (tmp_path / "out").exists()
