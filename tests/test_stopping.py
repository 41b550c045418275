"""fastpo.stopping with real signals: a training-like loop in a subprocess finishes its step, runs its
checkpoint and exits 0 with the resume line on the first SIGTERM / SIGINT / SIGUSR1; a second signal exits at
once with 128 + signum; handlers are restored; two gloo ranks agree to stop when only one was signalled."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastpo.stopping import GracefulStop

# a loop whose steps take 0.3 s; its "checkpoint" takes CHECKPOINT_SECONDS (argv[1])
LOOP = textwrap.dedent("""
    import sys, time
    from fastpo.stopping import GracefulStop

    with GracefulStop() as stop:
        for step in range(1, 1000):
            print(f"begin {step}", flush=True)
            time.sleep(0.3)
            print(f"end {step}", flush=True)
            if stop.should_stop():
                print("saving", flush=True)
                time.sleep(float(sys.argv[1]))
                print(f"saved {step}", flush=True)
                print(stop.resume_message(step, "ckpt/step-%07d" % step), flush=True)
                break
""")


def _start(checkpoint_seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOOP, str(checkpoint_seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read_until(proc: subprocess.Popen, line: str, seen: list, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = proc.stdout.readline()
        if not out:
            break
        seen.append(out.strip())
        if out.strip() == line:
            return
    proc.kill()
    raise AssertionError(f"no {line!r} in time; stdout {seen}, stderr {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_first_signal_finishes_the_step_and_checkpoints(signum):
    proc = _start(checkpoint_seconds=0.2)
    seen = []
    _read_until(proc, "begin 2", seen)
    os.kill(proc.pid, signum)  # mid-step 2 (or a later one on a busy machine)
    out, err = proc.communicate(timeout=60)
    lines = seen + out.splitlines()
    assert proc.returncode == 0, (lines, err)
    last = max(int(line.split()[1]) for line in lines if line.startswith("begin "))
    assert lines[lines.index(f"begin {last}") + 1:] == [
        f"end {last}", "saving", f"saved {last}",
        f"stopped on {signum.name} after step {last}; saved ckpt/step-{last:07d}; "
        "resume with --checkpoint.resume latest",
    ], lines
    assert f"{signum.name} received: finishing the current step, then saving a checkpoint" in err
    assert err.count("\n") == 1, err


def test_second_signal_exits_at_once():
    proc = _start(checkpoint_seconds=60)
    seen = []
    _read_until(proc, "begin 1", seen)
    os.kill(proc.pid, signal.SIGTERM)
    _read_until(proc, "saving", seen)
    start = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.time() - start < 10
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "saved" not in out and "second stop signal (SIGTERM): exiting now, without a checkpoint" in err


def test_handlers_are_restored_and_a_signal_sets_the_flag():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with GracefulStop(verbose=False) as stop:
        assert not stop.should_stop() and stop.flag() == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert stop.requested and stop.should_stop() and stop.flag() == 1.0
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert {s: signal.getsignal(s) for s in before} == before
    assert stop.should_stop(reduced=0.0) is False and stop.should_stop(reduced=1.0) is True


def _agree_worker(rank, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with GracefulStop(verbose=False) as stop:
            answers = [stop.should_stop()]
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            answers.append(stop.should_stop())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"answers": answers, "requested": stop.requested}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_when_one_is_signalled(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["answers"] for r in results] == [[False, True], [False, True]]
    assert [r["requested"] for r in results] == [False, True]
