"""`bench.report`: a results JSON -> Markdown tables with time ratios, and a PNG chart."""

import json

import pytest

from bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META = {"device": "cpu-test", "date": "2025-01-01", "torch": "2.13"}


def _time(bench, provider, ms, shape="s1", mode="fwd", **extra):
    return {"test": f"{bench}[{shape}-{provider}-{mode}]", "shape": shape, "provider": provider, "mode": mode,
            "median_ms": ms, **extra}


ROWS = [
    _time("bench_head_time", "gemm", 2.0),
    _time("bench_head_time", "fastpo-torch", 3.0, tokens_per_s=123456.0),
    _time("bench_head_time", "naive", 6.0),
    _time("bench_head_time", "liger-scaled-ce", 12.0),
    _time("bench_head_time", "trl-chunked", 4.0),
    _time("bench_head_time", "gemm", 5.0, mode="fwd_bwd"),
    _time("bench_head_time", "fastpo-torch", 10.0, mode="fwd_bwd"),
    _time("bench_head_time", "naive", 8.0, mode="fwd_bwd"),
    {"test": "bench_head_peak_memory[naive]", "shape": "s2", "provider": "naive", "mode": "fwd_bwd", "peak_mb": 512.0},
    {"test": "bench_head_peak_memory[fastpo-torch]", "shape": "s2", "provider": "fastpo-torch", "mode": "fwd_bwd",
     "peak_mb": 16.0},
    {"test": "bench_packing_fwd_bwd[r2-fastpo-shared]", "ratio": 2.0, "data": "hh-like", "provider": "fastpo-shared",
     "mode": "fwd_bwd", "median_ms": 30.0},
    {"test": "bench_packing_fwd_bwd[r2-naive-padded]", "ratio": 2.0, "data": "hh-like", "provider": "naive-padded",
     "mode": "fwd_bwd", "median_ms": 60.0},
]


def _by(rows, test):
    return next(r for r in rows if r["test"] == test)


def test_ratios_within_a_case():
    rows = report.add_ratios(ROWS)
    fast = _by(rows, "bench_head_time[s1-fastpo-torch-fwd]")
    assert fast["x_roofline"] == pytest.approx(1.5)
    assert fast["vs_naive"] == pytest.approx(0.5)
    assert fast["vs_liger"] == pytest.approx(0.25)
    assert fast["vs_trl"] == pytest.approx(0.75)
    slow = _by(rows, "bench_head_time[s1-fastpo-torch-fwd_bwd]")
    assert slow["x_roofline"] == pytest.approx(2.0) and slow["vs_naive"] == pytest.approx(1.25)
    assert "vs_liger" not in slow and "vs_trl" not in slow, "no liger/trl row in the fwd_bwd case"
    naive = _by(rows, "bench_head_time[s1-naive-fwd]")
    assert naive["x_roofline"] == pytest.approx(3.0) and not any(k.startswith("vs_") for k in naive)
    assert _by(rows, "bench_packing_fwd_bwd[r2-fastpo-shared]")["vs_naive"] == pytest.approx(0.5)
    memory = _by(rows, "bench_head_peak_memory[fastpo-torch]")
    assert "x_roofline" not in memory and "vs_naive" not in memory
    assert ROWS[1].keys() == _time("bench_head_time", "x", 1.0, tokens_per_s=1.0).keys(), "inputs left untouched"


def _tables(md):
    """{benchmark: (header cells, [row cells])} of a report's Markdown."""
    out, name = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            name = line[4:]
        elif line.startswith("| ") and name:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if name not in out:
                out[name] = (cells, [])
            else:
                out[name][1].append(dict(zip(out[name][0], cells)))
    return out


def test_write_md_and_png(tmp_path):
    paths = report.write(META, ROWS, str(tmp_path / "run"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["json", "md", "png"]
    assert json.loads((tmp_path / "run.json").read_text()) == {"meta": META, "results": ROWS}
    md = (tmp_path / "run.md").read_text()
    assert md.startswith("# fastpo benchmarks: cpu-test")
    assert "![median time and peak memory by provider](run.png)" in md
    tables = _tables(md)
    assert list(tables) == ["bench_head_time", "bench_head_peak_memory", "bench_packing_fwd_bwd"]
    header, rows = tables["bench_head_time"]
    assert header[:4] == ["shape", "provider", "mode", "median_ms"] and header[-4:] == [
        "x_roofline", "vs_naive", "vs_liger", "vs_trl"]
    assert "test" not in header
    fast = next(r for r in rows if r["provider"] == "fastpo-torch" and r["mode"] == "fwd")
    assert fast == {**fast, "median_ms": "3", "tokens_per_s": "123,456", "x_roofline": "1.5", "vs_naive": "0.5",
                    "vs_liger": "0.25", "vs_trl": "0.75"}
    assert next(r for r in rows if r["provider"] == "liger-scaled-ce")["vs_naive"] == ""
    mem_header, mem_rows = tables["bench_head_peak_memory"]
    assert "peak_mb" in mem_header and "x_roofline" not in mem_header and mem_rows[0]["peak_mb"] == "512"
    assert _tables(md)["bench_packing_fwd_bwd"][0][:3] == ["ratio", "data", "provider"]
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_panels_one_per_benchmark():
    found = [(name, metric, len(rows)) for name, metric, rows in report.panels(ROWS)]
    assert found == [("bench_head_time", "median_ms", 8), ("bench_head_peak_memory", "peak_mb", 2),
                     ("bench_packing_fwd_bwd", "median_ms", 2)]


def test_cli_writes_beside_the_json(tmp_path, capsys):
    path = tmp_path / "2025-01-01-cpu.json"
    path.write_text(json.dumps({"meta": META, "results": ROWS}))
    report.main([str(path)])
    assert (tmp_path / "2025-01-01-cpu.md").exists()
    assert (tmp_path / "2025-01-01-cpu.png").read_bytes().startswith(PNG_MAGIC)
    stem = str(tmp_path / "2025-01-01-cpu")
    assert capsys.readouterr().out.split() == [stem + ".md", stem + ".png"]


def test_empty_results_still_write_a_chart(tmp_path):
    report.write(META, [], str(tmp_path / "empty"))
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_without_matplotlib_json_and_md_only(tmp_path, monkeypatch):
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    paths = report.write(META, ROWS, str(tmp_path / "run"))
    assert paths == [str(tmp_path / "run.json"), str(tmp_path / "run.md")] and not (tmp_path / "run.png").exists()
    assert "No chart: matplotlib is not installed" in (tmp_path / "run.md").read_text()
