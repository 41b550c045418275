"""The GPU session (`bench/gpu_session.sh`, `bench.session`) cannot rot between leases: its dry run runs every
stage through the code a lease runs, at tiny shapes on CPU, and must come back clean, with complete files;
the cap, the cut and the verdict logic are checked on their own.

A lease itself (`bash bench/gpu_session.sh run OUT`) needs CUDA and is not run here.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.session import record, runner, summary, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_FIELDS = ("device", "device_type", "torch", "triton", "transformers", "date", "command", "stage_command",
               "cap_s", "mode")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(exit code, output, out dir, seconds) of `bash bench/gpu_session.sh dry-run OUT`."""
    out = tmp_path_factory.mktemp("session")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("FASTPO_SESSION_T0", None)
    t0 = time.time()
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "dry-run", str(out)], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600, check=False)
    return proc.returncode, proc.stdout + proc.stderr, str(out), time.time() - t0


def _stage_file(out, index, stage):
    data = record.load(record.stage_path(out, index, stage.name))
    assert data is not None, f"no file for stage {stage.name}"
    return data


@pytest.mark.slow
def test_dry_run_is_clean_and_complete(dry_run):
    rc, output, out, seconds = dry_run
    assert rc == 0, output[-6000:]
    assert seconds < 300, f"the dry run took {seconds:.0f} s"
    assert sorted(os.listdir(out)) == sorted([f"{i}-{s.name}.json" for i, s in enumerate(runner.STAGES, 1)]
                                             + ["session.log", "summary.md"])
    assert len(os.listdir(out)) <= 8, "a device call returns at most 8 files"
    for index, stage in enumerate(runner.STAGES, 1):
        data = _stage_file(out, index, stage)
        assert data["status"] == "complete", (stage.name, data["status"])
        assert data["rows"] and not [r for r in data["rows"] if "error" in r], (stage.name, data["rows"])
        assert all(data["meta"].get(k) is not None for k in META_FIELDS), data["meta"]
        assert data["meta"]["mode"] == "dry-run" and "gpu_session.sh dry-run" in data["meta"]["command"]
        assert isinstance(data["plan"], dict) and data["plan"], stage.name
        assert f"== stage {index}/{len(runner.STAGES)} {stage.name}" in output  # the plan is printed
        assert f"-- {stage.name}: complete in" in output  # and the stage's time


@pytest.mark.slow
def test_dry_run_covers_every_case_of_the_plan(dry_run):
    """Every planned case ran (or says why not): a stage cannot silently drop a provider or a backend."""
    _, _, out, _ = dry_run
    files = {s.name: _stage_file(out, i, s) for i, s in enumerate(runner.STAGES, 1)}
    parity = files["parity"]
    assert len(parity["rows"]) == len(parity["plan"]["dtypes"]) * (
        len(parity["plan"]["head_op"]) + len(parity["plan"]["pair_fused"]))
    assert all(r["ok"] for r in parity["rows"]), "the dry run's parity cases are the test suite's: they pass"
    head = files["head"]
    assert [(r["provider"], r["mode"]) for r in head["rows"]] == [(p, m) for p, m in head["plan"]["cases"]]
    for r in head["rows"]:
        assert "median_ms" in r or r.get("skipped"), r
    timed = {r["provider"] for r in head["rows"] if "median_ms" in r}
    assert {"gemm", "fastpo-triton", "fastpo-pair-fused"} <= timed
    assert [r["provider"] for r in files["dpo"]["rows"]] == files["dpo"]["plan"]["providers"]
    assert [r["provider"] for r in files["train"]["rows"]] == ["fastpo", "naive"]
    assert all("tokens_per_s" in r for r in files["train"]["rows"])
    attention = files["attention"]
    assert [r["backend"] for r in attention["rows"]] == attention["plan"]["backends"]
    assert all(r["ok"] for r in attention["rows"])


@pytest.mark.slow
def test_dry_run_summary_reports_targets_without_gpu_verdicts(dry_run):
    _, _, out, _ = dry_run
    text = open(os.path.join(out, "summary.md")).read()
    assert "Not a GPU measurement" in text and "(dry-run)" in text
    for stage in runner.STAGES:
        assert f"{stage.name}: {stage.title}" in text
    verdicts = [t["verdict"] for i, s in enumerate(runner.STAGES, 1) for t in _stage_file(out, i, s)["targets"]]
    assert len(verdicts) == len(targets.TARGETS)
    assert not {"pass", "miss"} & set(verdicts), "a CPU dry run must not grade GPU targets"
    assert all(v.startswith("n/a") for v in verdicts), verdicts


def test_stage_over_its_cap_is_killed_and_says_so(tmp_path):
    """The cap is a wall clock: a stage still importing at its cap is killed; its file says it was cut."""
    index, stage = runner.stage_by_name("attention")
    data = runner.run_stage(index, stage, str(tmp_path), cap=0.5, mode="dry-run", command="test")
    assert data["status"].startswith("cut: killed at the cap of 0.5 s")
    assert data["elapsed_s"] < 30
    assert json.load(open(record.stage_path(str(tmp_path), index, stage.name)))["status"] == data["status"]
    assert "cut: killed" in open(summary.write_summary(str(tmp_path))).read()


def test_case_after_the_deadline_is_not_started(tmp_path):
    """Inside a stage, a case is started only before the stage's deadline; the record keeps what finished."""
    meta = record.meta("head", 2, "t", "dry-run", 10.0, "cmd", "stage cmd", {"device": "cpu", "device_type": "cpu"})
    rec = record.StageRecord(str(tmp_path / "2-head.json"), meta, started=time.time())
    assert not rec.out_of_time("first")
    with rec.case(provider="gemm", mode="fwd") as row:
        row["median_ms"] = 1.0
    with rec.case(provider="broken", mode="fwd"):
        raise RuntimeError("boom")
    rec.deadline = time.time() - 1
    assert rec.out_of_time("second")
    rec.finish()
    data = json.load(open(tmp_path / "2-head.json"))
    assert data["status"] == "cut: the cap of 10 s was reached before case 'second'"
    assert data["rows"][0]["median_ms"] == 1.0 and data["rows"][1]["error"] == "RuntimeError: boom"


def test_session_budget_leaves_late_stages_unrun(tmp_path, capsys):
    """With too little of the session budget left, a stage is not started; its file and the summary say so
    (and the run is not clean)."""
    rc = runner.run_session(str(tmp_path), "dry-run", only=["parity"], budget_s=runner.MIN_STAGE_S - 1)
    assert rc == 1 and "parity: not run" in capsys.readouterr().out
    data = json.load(open(record.stage_path(str(tmp_path), 1, "parity")))
    assert data["status"].startswith("not run: ") and not data["rows"]
    assert "not run: " in open(tmp_path / "summary.md").read()


def _head_rows(fastpo_x, pair_x, ref_x):
    def timed(provider, mode, ms):
        return {"test": f"head[s-{provider}-{mode}]", "shape": "s", "provider": provider, "mode": mode,
                "median_ms": ms}

    return [timed("gemm", "fwd", 10.0), timed("gemm", "fwd_bwd", 30.0),
            timed("fastpo-triton", "fwd_bwd", 30 * fastpo_x), timed("fastpo-pair-fused", "fwd_bwd", 30 * pair_x),
            timed("fastpo-triton", "fwd", 10 * ref_x)]


@pytest.mark.parametrize("device_type, mode, want", [
    ("cuda", "run", ["pass", "miss", "pass"]),
    ("cuda", "dry-run", ["n/a"] * 3),  # tiny shapes on a GPU are not the targets' shape either
    ("cpu", "dry-run", ["n/a"] * 3),
])
def test_head_targets_are_graded_only_for_a_gpu_run(device_type, mode, want):
    rows = _head_rows(fastpo_x=1.3, pair_x=1.2, ref_x=1.05)
    got = targets.evaluate("head", rows, {"device_type": device_type, "mode": mode})
    assert [t["verdict"].split(" ")[0] for t in got] == want
    assert [round(t["measured"], 6) for t in got] == [1.3, 1.2, 1.05]
    assert [t["goal"] for t in got] == ["<= 1.35", "<= 1.15", "<= 1.1"]


def test_train_and_dpo_targets():
    gpu = {"device_type": "cuda", "mode": "run"}
    train = [{"test": "train[s-fastpo]", "provider": "fastpo", "mode": "train_step", "median_ms": 1.0,
              "tokens_per_s": 300.0, "peak_mb": 50.0},
             {"test": "train[s-naive]", "provider": "naive", "mode": "train_step", "median_ms": 3.0,
              "tokens_per_s": 100.0, "peak_mb": 100.0}]
    assert [t["verdict"] for t in targets.evaluate("train", train, gpu)] == ["pass", "pass"]
    dpo = [{"test": "dpo[s-liger-dpo]", "provider": "liger-dpo", "mode": "fwd_bwd", "median_ms": 15.0},
           {"test": "dpo[s-fastpo-pair-fused]", "provider": "fastpo-pair-fused", "mode": "fwd_bwd", "median_ms": 10.0}]
    (dpo_target,) = targets.evaluate("dpo", dpo, gpu)
    assert dpo_target["measured"] == 1.5 and dpo_target["verdict"] == "miss"
    (missing,) = targets.evaluate("dpo", dpo[:1], gpu)
    assert missing["verdict"] == "not measured"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_gpu_run_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "bench.session", "run", "/nonexistent-out"], cwd=REPO, text=True,
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 2 and "needs CUDA" in proc.stderr


def test_wheel_size_check_fails_loudly(tmp_path):
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"0" * 1024)
    ok = subprocess.run(["bash", "bench/gpu_session.sh", "check-wheels", str(tmp_path)], cwd=REPO, text=True,
                        capture_output=True, check=False)
    assert ok.returncode == 0 and "in all (limit 40 MiB)" in ok.stdout
    with open(tmp_path / "big-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(41 * 2**20)
    big = subprocess.run(["bash", "bench/gpu_session.sh", "check-wheels", str(tmp_path)], cwd=REPO, text=True,
                         capture_output=True, check=False)
    assert big.returncode == 1 and "ERROR" in big.stderr
