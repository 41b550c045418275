"""Packaging: a wheel builds without setuptools warnings and ships the kernels as `fastpo.kernels` (never a
top-level `kernels`) and the bundled demo's model config, tokenizer and data."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_ships_assets(tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}  # byte-compiling off is this machine's, not a package issue
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                           str(tmp_path), ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower() and "byte-compil" not in line]
    assert not warnings, warnings
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "train.jsonl", "eval.jsonl"):
        assert f"fastpo/assets/demo/{name}" in names
    assert "fastpo/kernels/logprobs.py" in names and not any(n.startswith("kernels/") for n in names)
