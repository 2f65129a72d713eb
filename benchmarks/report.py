#!/usr/bin/env python
"""Performance report from a pytest-benchmark JSON file: ``REPORT.md`` plus PNG plots.

    python benchmarks/report.py benchmarks/last.json [--out benchmarks/report]

For every op (``extra_info["op"]``) and device, one figure with a panel per (direction, shape)
group: horizontal bars of the median time per contender, each labelled with its speedup vs the
eager reference and, where the group counts them, its throughput: GB/s (memory-bound ops; the
``copy`` contender's bar is the bandwidth limit of the same bytes) or FLOP/s (attention, GEMMs:
TFLOP/s on CUDA, GFLOP/s elsewhere, with the fraction of the matmul peak measured in the run).
``REPORT.md`` states the machine, versions and dtypes, embeds the plots and repeats every number
as the tables of ``summarize.py``. Needs matplotlib for the plots (the tables are written
without it).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summarize  # noqa: E402


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def _by_op(groups) -> "OrderedDict[tuple[str, str], list[tuple[str, list[dict]]]]":
    ops: OrderedDict = OrderedDict()
    for g, benches in groups.items():
        # the op and the device from the rows that carry them (a row cut off before its labels
        # carries neither; the diffusers rows had no "op" until 2026-12-07: their device was
        # lost, and on a GPU machine their cpu and cuda groups shared one "device unknown" plot)
        infos = [b.get("extra_info") or {} for b in benches]
        op = next((ei["op"] for ei in infos if ei.get("op")), None) or g.split()[0]
        device = next((ei["device"] for ei in infos if ei.get("device")), None) or "device unknown"
        key = (op, device)
        ops.setdefault(key, []).append((g, benches))
    return ops


def _rows(benches: list[dict]) -> list[dict]:
    rows = []
    for b in benches:
        ei = b.get("extra_info") or {}
        m = summarize._median_s(b)
        if not m or not ei.get("contender"):  # no time, or no metadata (summarize lists those)
            continue
        rows.append({"contender": ei.get("contender") or b.get("name", "?"), "median_s": m,
                     "bytes": ei.get("bytes_moved"), "flops": ei.get("flops"),
                     "peak": ei.get("matmul_peak_flops")})
    return summarize._row_order(rows, "order")


def plot_op(op: str, device: str, panels, path: str) -> bool:
    """One PNG for an op on a device; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.0 + 0.42 * sum(max(1, len(b)) for _, b in panels)
                                            + 0.6 * n), squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], panels):
        rows = _rows(benches)
        ref = next((r["median_s"] for r in rows if r["contender"] == summarize.REFERENCE), None)
        names = [r["contender"] for r in rows]
        ms = [r["median_s"] * 1e3 for r in rows]
        ei = next((b.get("extra_info") for b in benches if (b.get("extra_info") or {}).get("op")), {})
        bounds = (summarize.COPY,) + summarize.BOUNDS.get(ei.get("op"), ())
        colors = ["tab:green" if summarize.is_ours(c) else  # ours, the bounds, the peers
                  "tab:gray" if c in bounds else "tab:blue" for c in names]
        ax.barh(range(len(rows)), ms, color=colors)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlabel("median ms per call (lower is better)")
        ax.set_title(group, fontsize=9)
        for i, r in enumerate(rows):
            label = []
            if ref:
                label.append(f"{ref / r['median_s']:.2f}x ref")
            if r["flops"]:
                rate = r["flops"] / r["median_s"]
                unit, scale = summarize.flop_unit(device)
                label.append(f"{rate / scale:.{0 if rate / scale >= 10 else 2}f} {unit}"
                             + (f" ({rate / r['peak']:.0%} of matmul peak)" if r["peak"] else ""))
            elif r["bytes"]:
                label.append(f"{r['bytes'] / r['median_s'] / 1e9:.1f} GB/s")
            ax.text(ms[i], i, "  " + ", ".join(label), va="center", fontsize=8)
        ax.set_xlim(0, max(ms) * 1.45 if ms else 1)
    fig.suptitle(f"{op} on {device}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(json_path: str, out_dir: str) -> str:
    data, groups = summarize.load(json_path)
    os.makedirs(out_dir, exist_ok=True)
    mi = data.get("machine_info") or {}
    lines = ["# vidgen-kernels performance report", ""]
    infos = [b.get("extra_info") or {} for bs in groups.values() for b in bs]
    complete = [ei for ei in infos if ei.get("contender")]  # (a failed case has no metadata)
    first = complete[0] if complete else {}

    def values(key):  # the distinct values of a metadata field over the complete cases
        return ", ".join(sorted({str(ei[key]) for ei in complete if ei.get(key) is not None})) or "?"
    if not infos:
        lines += ["(no benchmarks in the file)", ""]
    if summarize.is_quick(groups):
        lines += [summarize.QUICK_NOTE, ""]
    lines += [f"* run: {data.get('datetime', '?')} on `{mi.get('node', '?')}`",
              f"* devices: {values('device_name')}",
              f"* dtypes: {values('dtype')}; torch threads: {values('torch_threads')}",
              f"* torch {first.get('torch_version', '?')}, triton {first.get('triton_version', '?')}, "
              f"Python {mi.get('python_version', '?')}",
              f"* source: `{os.path.basename(json_path)}` ({sum(len(b) for b in groups.values())} "
              "cases); per-call medians over the rounds recorded per case in the JSON (`rounds`: "
              "at least 3; CPU: perf_counter per call; CUDA: one synchronise per timed batch, "
              "CUDA events cross-check in the JSON)",
              "* the speedup columns are the named peer's median over this row's median (> 1: this "
              "row is faster); `copy` is `dst.copy_(src)` of the same bytes, a reference rate, not "
              "a hard limit (a kernel with streaming stores can beat it); \"best peer\" leaves out "
              "our own contenders and the bounds (copy, SDPA without RoPE, the dense FFN); rows "
              "marked ⚠ were measured while other processes used the CPU"]
    peaks: dict = {}  # (device, its name, dtype) -> the values measured (once per pytest process)
    for ei in complete:
        if ei.get("matmul_peak_flops"):
            key = (str(ei.get("device")), str(ei.get("device_name")), str(ei.get("dtype")))
            peaks.setdefault(key, set()).add(ei["matmul_peak_flops"])

    def rate(device, values):  # in the tables' unit
        unit, scale = summarize.flop_unit(device)
        return "-".join(f"{p / scale:.3g}" for p in sorted({min(values), max(values)})) + " " + unit
    if peaks:
        lines.append("* matmul peak (a large square `torch.mm`, measured in this run; the FLOP-rate "
                     "rows are set against it): " + "; ".join(
                         f"{name} {dt} {rate(dev, v)}" for (dev, name, dt), v in sorted(peaks.items())))
    lines.append("")
    for (op, device), panels in _by_op(groups).items():
        lines += [f"## {op} ({device})", ""]
        png = f"{_slug(op)}-{_slug(device)}.png"
        if plot_op(op, device, panels, os.path.join(out_dir, png)):
            lines += [f"![{op} on {device}]({png})", ""]
        for group, benches in panels:
            lines += [summarize.table(group, benches).replace("### ", "### ", 1), ""]
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(out_dir, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="file written by pytest --benchmark-json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "report"),
                    help="folder for REPORT.md and the PNGs (default: benchmarks/report)")
    a = ap.parse_args(argv)
    render(a.json, a.out)
    print(f"report: {os.path.join(a.out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
