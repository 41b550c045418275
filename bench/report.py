"""Benchmark reports: a results JSON -> Markdown tables and a PNG chart.

    python -m bench.report bench/results/<date>-<device>.json    # writes <stem>.md and <stem>.png beside it

The JSON is what `pytest bench/ --save-results` writes: `{"meta": {...}, "results": [row, ...]}`, one row
per benchmark case, with `median_ms` (timed rows) or `peak_mb` (memory rows). Rows are grouped by benchmark
(the test function). Within one benchmark a *case* is one shape (or data ratio) and mode, and providers are
compared within a case by time ratios (this row's median time / the other's; below 1 = faster):

    x_roofline                  every timed row, against the `gemm` provider (the bare LM-head GEMMs)
    vs_naive, vs_liger, vs_trl  fastpo rows only, against the provider of that family in the case
    vs_generic                  fastpo rows only, against `fastpo-generic` (the generic head path) in the case

A provider's family is its name up to the first "-" (`liger-dpo` -> liger, `naive-padded` -> naive).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

CASE_FIELDS = ("shape", "ratio", "mode")
"""Fields that, with the benchmark, identify a case across providers."""
LEAD_COLUMNS = ("shape", "ratio", "data", "provider", "mode", "median_ms", "peak_mb")
ROOFLINE = "gemm"
GENERIC = "fastpo-generic"
HEADLINE = ("naive", "liger", "trl")
"""Families that fastpo rows are compared against, one `vs_<family>` column each."""
RATIO_NOTE = (
    "`x_roofline` and `vs_<family>` are time ratios within a case (same benchmark, shape or ratio, and "
    "mode): this row's median time / that of the `gemm` provider or of the named provider family. "
    "Below 1 is faster."
)


def load(path: str) -> tuple[dict, list[dict]]:
    """(meta, rows) of a results JSON."""
    with open(path) as f:
        data = json.load(f)
    return data.get("meta", {}), data["results"]


def bench_name(row: dict) -> str:
    """The test function of a row: `bench_head_time[cpu-small-naive-fwd]` -> `bench_head_time`."""
    return row.get("test", "").split("[")[0]


def family(provider: str) -> str:
    return provider.split("-")[0]


def case_key(row: dict) -> tuple:
    return (bench_name(row), *(row.get(k) for k in CASE_FIELDS))


def add_ratios(rows: list[dict]) -> list[dict]:
    """Copies of `rows` with `x_roofline` and the `vs_<family>` time ratios where they apply."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "median_ms" in r and "provider" in r:
            times.setdefault(case_key(r), {}).setdefault(r["provider"], r["median_ms"])
    return [_with_ratios(r, times.get(case_key(r), {})) for r in rows]


def _with_ratios(row: dict, case_times: dict[str, float]) -> dict:
    row = dict(row)
    t = row.get("median_ms")
    if t is None:
        return row
    if ROOFLINE in case_times:
        row["x_roofline"] = t / case_times[ROOFLINE]
    if family(row.get("provider", "")) != "fastpo":
        return row
    if GENERIC in case_times and row["provider"] != GENERIC:
        row["vs_generic"] = t / case_times[GENERIC]
    for fam in HEADLINE:
        other = next((v for p, v in case_times.items() if family(p) == fam), None)
        if other is not None:
            row[f"vs_{fam}"] = t / other
    return row


def group_by_bench(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(bench_name(r), []).append(r)
    return groups


def columns(rows: list[dict]) -> list[str]:
    """Case and headline measurements first, then the rest in order of appearance, ratios last."""
    seen = []
    for r in rows:
        seen += [k for k in r if k not in seen and k != "test"]
    ratios = [c for c in seen if c == "x_roofline" or c.startswith("vs_")]
    lead = [c for c in LEAD_COLUMNS if c in seen]
    return lead + [c for c in seen if c not in lead and c not in ratios] + ratios


def fmt(v) -> str:
    """Floats to 4 significant digits (thousands separators from 10^4 up); None as empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    """One table per benchmark, ratios included."""
    parts = [f"### {name}\n\n{table(group)}" for name, group in group_by_bench(add_ratios(rows)).items()]
    return "\n".join(parts)


def document(meta: dict, rows: list[dict], chart: str | None = None) -> str:
    """The Markdown file: title, run metadata, the ratio legend, the chart link and the tables."""
    head = f"# fastpo benchmarks: {meta.get('device', 'unknown device')}\n\n"
    head += "".join(f"- {k}: `{v}`\n" for k, v in meta.items()) + "\n" + RATIO_NOTE + "\n\n"
    if chart:
        head += f"![median time and peak memory by provider]({chart})\n\n"
    else:
        head += "No chart: matplotlib is not installed (`python -m bench.report <json>` draws it later).\n\n"
    return head + markdown(rows)


def _case_label(row: dict) -> str:
    parts = [str(row["shape"]) if row.get("shape") is not None else None,
             f"r{row['ratio']:g}" if isinstance(row.get("ratio"), (int, float)) else None, row.get("mode")]
    return "/".join(p for p in parts if p)


def panels(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(benchmark, metric, rows) per chart panel: median time where measured, else peak memory."""
    out = []
    for name, group in group_by_bench(rows).items():
        for metric in ("median_ms", "peak_mb"):
            measured = [r for r in group if isinstance(r.get(metric), (int, float)) and "provider" in r]
            if measured:
                out.append((name, metric, measured))
                break
    return out


def _draw_panel(ax, name: str, metric: str, rows: list[dict]) -> None:
    """Grouped bars: one group per case, one bar per provider; log y when values span > 30x."""
    cases = list(dict.fromkeys(_case_label(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = {_case_label(r): r[metric] for r in rows if r["provider"] == p}
        xs = [j + (i - (len(providers) - 1) / 2) * width for j, c in enumerate(cases) if c in vals]
        ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=p)
    values = [r[metric] for r in rows if r[metric] > 0]
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel({"median_ms": "median time (ms)", "peak_mb": "peak memory (MB)"}[metric])
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """Write the chart to `path` (PNG): one panel per benchmark (time, or peak memory for memory runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels(rows)
    fig, axes = plt.subplots(max(1, len(found)), 1, figsize=(11, 3.2 * max(1, len(found))), squeeze=False,
                             layout="constrained")
    for ax, (name, metric, group) in zip(axes[:, 0], found):
        _draw_panel(ax, name, metric, group)
    if not found:
        axes[0, 0].text(0.5, 0.5, "no timed or memory rows", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(meta: dict, rows: list[dict], stem: str, *, json_too: bool = True) -> list[str]:
    """Write `<stem>.json` (raw rows; with `json_too`), `<stem>.md` and `<stem>.png` (where matplotlib is
    installed; the Markdown says so where it is not); returns the paths written."""
    paths = []
    if json_too:
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
        paths.append(stem + ".json")
    chart = None
    if importlib.util.find_spec("matplotlib") is not None:
        chart = plot(rows, stem + ".png", title=f"fastpo benchmarks: {meta.get('device', '')}")
    with open(stem + ".md", "w") as f:
        f.write(document(meta, rows, chart=os.path.basename(chart) if chart else None))
    return paths + [stem + ".md"] + ([chart] if chart else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON files written by `pytest bench/ --save-results`")
    for path in parser.parse_args(argv).results:
        meta, rows = load(path)
        for out in write(meta, rows, os.path.splitext(path)[0], json_too=False):
            print(out)


if __name__ == "__main__":
    main()
