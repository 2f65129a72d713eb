#!/usr/bin/env python
"""Markdown tables from a pytest-benchmark JSON file (``--benchmark-json``).

    python benchmarks/summarize.py /tmp/b.json [--sort median|order] [--out summary.md]

One table per pytest-benchmark group (op, direction, shape, dtype, device), one row per
contender: median per-call time, effective GB/s (``extra_info["bytes_moved"]`` / median; see
``benchmarks/common.py`` for what is counted), speedup vs the eager reference and vs
``torch.compile`` (their median / this median: > 1 is faster), and the fraction of the copy
bandwidth (copy median / this median, the copy moving the same bytes: a reference rate, not a
hard limit), and the speedup vs the best peer (the fastest contender that is neither ours (the
kernel backends, the fused model, the patched diffusers model, compiled or not) nor a bound (the copy; SDPA
without the rotation for RoPE-3D attention; the dense FFN of the same FLOPs for the MoE): eager
reference, torch.compile, rotate+SDPA, matmul-softmax, grouped_mm, ...); a line under the table
gives the speedup vs every peer by name. A FLOP-rate column
(``extra_info["flops"]`` / median; TFLOP/s on CUDA, GFLOP/s elsewhere) appears when the group's
cases count FLOPs, followed by the fraction of the device's matmul peak (``extra_info
["matmul_peak_flops"]``: a large square matmul of the same dtype measured in the same run,
``benchmarks/common.py``); an activation-memory column (MiB kept for backward,
``extra_info["activation_bytes"]``, and its ratio to the eager reference's) and a peak-memory
column (``extra_info["peak_mem_bytes"]``: CUDA max allocated during one step) when they record
them. Where cases record interleaved-pair speedups (``extra_info["paired_vs_<peer>"]``:
``reference`` and ``compile`` in the DiT block and temporal attention benchmarks, ``sdpa`` and
``rotate_sdpa`` in RoPE-3D attention, ``dense`` in the MoE, ``diffusers`` in the diffusers
drop-in) a line under the table gives them. Works on
any benchmark whose ``extra_info`` has ``contender`` and ``bytes_moved``; without them rows show
the test name and the columns that need them are left blank.

Only the standard library is used (no torch import), so it runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

REFERENCE, COMPILE, COPY = "reference", "torch.compile", "copy"
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
# the fused DiT block, the patched diffusers model; the Triton temporal attention with one of its
# kernel sets forced and the Triton MoE with its first GEMM tiles (variants of ours, not peers)
OURS = KERNEL_BACKENDS + ("fused", "patched", "patched+torch.compile", "triton-tiled",
                          "triton-resident", "triton-small-tiles")
TILE_VARIANT = "tiles "  # benchmarks/test_bench_tiles.py: "tiles default", "tiles <variant>"


def is_ours(contender: str) -> bool:
    """Whether a contender is one of ours (a kernel backend, a variant of one), not a peer."""
    return contender in OURS or contender.startswith(TILE_VARIANT)


# contenders that bound the op rather than compute it (not peers): per op, besides the copy
BOUNDS = {"rope3d_attention": ("sdpa",), "moe_ffn": ("dense",), "triton_tiles": ("dense",)}
NOISY_SHARE = 0.10  # as benchmarks/common.py: rows measured while others used > 10 % of the CPU
_LAST = (COMPILE, REFERENCE, COPY)  # kernel backends first, then these, in this order
_PAIRED = "paired_vs_"
_PAIRED_QUALIFIERS = ("_min", "_max", "_reps")
_PAIRED_NOTES = ("_skipped", "_error")
# extra_info["paired_vs_<key>"] (interleaved-pair speedups, common.paired_speedup): the peer's name
PAIRED_PEERS = {"reference": "eager reference", "compile": "torch.compile", "sdpa": "SDPA alone",
                "rotate_sdpa": "rotate+sdpa", "dense": "the dense FFN",
                "diffusers": "unpatched diffusers",
                # test_bench_block: the full-size reference does not fit; both at fewer frames
                "reference_at_fewer_frames": "eager reference, both at fewer frames"}


def _median_s(bench: dict) -> float | None:
    """Per-call median in seconds: pytest-benchmark's stats (already per call: it divides each
    round by its iterations)."""
    st = bench.get("stats") or {}
    return st.get("median")


def load(path: str) -> tuple[dict, "OrderedDict[str, list[dict]]"]:
    """``(data, groups)``: the file and its benchmarks by group. A file that cannot be read or
    is not a pytest-benchmark JSON object exits with a one-line message. A group measured on
    several machines or devices (files merged with ``merge_json.py --allow-mixed``) is split by
    both, so that no table compares one machine's row with another's."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'summarize'}: cannot read {path}: "
                         f"{type(e).__name__}: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'summarize'}: {path} is not a "
                         f"pytest-benchmark JSON (an object with a 'benchmarks' list)")
    benches = [b for b in data.get("benchmarks", []) if isinstance(b, dict)]

    def where(b):  # the machine (merge_json's machine_node) and device of a case
        ei = b.get("extra_info") or {}
        return " on ".join(str(v) for v in (ei.get("device_name"), ei.get("machine_node")) if v)
    by_name: OrderedDict[str, list[dict]] = OrderedDict()
    for b in benches:
        by_name.setdefault(b.get("group") or "(no group)", []).append(b)
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for g, bs in by_name.items():
        if len({where(b) for b in bs} - {""}) > 1:  # one group measured on several machines
            for b in bs:
                groups.setdefault(f"{g} [{where(b) or '?'}]", []).append(b)
        else:
            groups[g] = bs
    return data, groups


def flop_unit(device) -> tuple[str, float]:
    """The unit FLOP rates are shown in on ``device`` (``extra_info["device"]``): TFLOP/s on
    CUDA, GFLOP/s elsewhere; ``(name, FLOP/s per unit)``."""
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def _row_order(rows: list[dict], sort: str) -> list[dict]:
    if sort == "median":
        return sorted(rows, key=lambda r: (r["median_s"] is None, r["median_s"] or 0))

    def key(r):
        c = r["contender"]
        return (_LAST.index(c) + 1 if c in _LAST else 0, c)
    return sorted(rows, key=key)


def table(group: str, benches: list[dict], sort: str = "order") -> str:
    rows = []
    for b in benches:
        ei = b.get("extra_info") or {}
        # a case that failed (or was cut off) after its timing has no metadata: it is listed,
        # marked incomplete, and never counted as a peer (it would be compared with itself)
        incomplete = not ei.get("contender")
        rows.append({"contender": ei.get("contender") or
                     f"{b.get('name', '?')} (incomplete: no metadata)",
                     "median_s": _median_s(b), "bytes": ei.get("bytes_moved"),
                     "flops": ei.get("flops"), "ei": ei, "incomplete": incomplete})
    by = {r["contender"]: r["median_s"] for r in rows if not r["incomplete"]}
    ref, comp, copy = by.get(REFERENCE), by.get(COMPILE), by.get(COPY)
    op = next((b.get("extra_info", {}).get("op") for b in benches), None)
    bounds = (COPY,) + BOUNDS.get(op, ())
    peers = [m for c, m in by.items() if m and not is_ours(c) and c not in bounds]
    best_peer = min(peers) if peers else None
    with_flops = any(r["flops"] for r in rows)
    with_peak = with_flops and any(r["ei"].get("matmul_peak_flops") for r in rows)
    acts = {r["contender"]: r["ei"].get("activation_bytes") for r in rows}
    with_act = any(v for v in acts.values())
    ref_act = acts.get(REFERENCE)
    peak_mems = {r["contender"]: r["ei"].get("peak_mem_bytes") for r in rows}
    with_peak_mem = any(v for v in peak_mems.values())
    ref_peak_mem = peak_mems.get(REFERENCE)

    first = next((r["ei"] for r in rows if not r["incomplete"]), {})
    meta = ", ".join(str(x) for x in (first.get("device_name"), first.get("torch_version") and
                                      f"torch {first.get('torch_version')}",
                                      first.get("triton_version") and
                                      f"triton {first.get('triton_version')}") if x)
    out = [f"### {group}", ""]
    if meta:
        out += [f"_{meta}_", ""]
    # FLOP rates in TFLOP/s on GPUs, GFLOP/s elsewhere; "of matmul peak": the rate over the
    # measured rate of a large square matmul of the same dtype on the same device
    fl_unit, fl_scale = flop_unit(first.get("device"))
    fl_head, fl_rule = (f" {fl_unit} |", "---:|") if with_flops else ("", "")
    if with_peak:
        fl_head, fl_rule = fl_head + " of matmul peak |", fl_rule + "---:|"
    act_head, act_rule = (" activation MiB (vs ref) |", "---:|") if with_act else ("", "")
    if with_peak_mem:
        act_head, act_rule = act_head + " peak MiB (vs ref) |", act_rule + "---:|"
    out += [f"| contender | median ms | GB/s |{fl_head} vs eager ref | vs torch.compile | "
            f"vs best peer | of copy BW |{act_head}",
            f"|---|---:|---:|{fl_rule}---:|---:|---:|---:|{act_rule}"]
    noisy = False
    for r in _row_order(rows, sort):
        m = r["median_s"]
        share = r["ei"].get("other_processes_cpu_share")
        mark = ""
        if share is not None and share > NOISY_SHARE:
            mark, noisy = f" ⚠{share:.0%}", True
        gbps = r["bytes"] / m / 1e9 if (m and r["bytes"]) else None
        sp_ref = ref / m if (m and ref) else None
        sp_comp = comp / m if (m and comp) else None
        sp_peer = best_peer / m if (m and best_peer) else None
        frac = copy / m if (m and copy) else None
        rate = r["flops"] / m if (m and r["flops"]) else None
        gflops = f" {_fmt(rate and rate / fl_scale, '.1f' if fl_scale == 1e9 else '.3g')} |"
        if with_peak:
            peak = r["ei"].get("matmul_peak_flops")
            gflops += f" {_fmt(rate / peak * 100 if (rate and peak) else None, '.0f', '%')} |"
        act_cell = ""
        for with_col, vals, ref_val in ((with_act, acts, ref_act),
                                        (with_peak_mem, peak_mems, ref_peak_mem)):
            if with_col:
                v = vals.get(r["contender"])
                act_cell += f" {_fmt(v and v / 2**20, '.1f')}"
                if v and ref_val:
                    act_cell += f" ({v / ref_val:.2f}x)"
                act_cell += " |"
        out.append(f"| {r['contender']}{mark} | {_fmt(m and m * 1e3, '.3f')} | {_fmt(gbps, '.1f')} |"
                   f"{gflops if with_flops else ''} {_fmt(sp_ref, '.2f', 'x')} | "
                   f"{_fmt(sp_comp, '.2f', 'x')} | {_fmt(sp_peer, '.2f', 'x')} | "
                   f"{_fmt(frac and frac * 100, '.0f', '%')} |{act_cell}")
    if noisy:
        out += ["", "⚠N%: other processes used N% of the CPU time while this row was measured."]
    # every other peer by name (the columns give the reference, torch.compile and the best one)
    named = [(c, m) for c, m in by.items() if m and not is_ours(c) and c not in (REFERENCE, COMPILE, COPY)]
    ours = [(c, m) for c, m in by.items() if m and is_ours(c)]
    if named and ours:
        out += ["", "Speedup vs each peer (its median / this one's): " + "; ".join(
            f"{c}: " + ", ".join(f"vs {p} {pm / m:.2f}x" for p, pm in named) for c, m in ours)
            + "."]
    # paired_vs_<peer> is the speedup; its _min / _max / _reps (the calls per timed batch: a
    # count, not a ratio) qualify it, and _skipped / _error (strings) say why there is none
    found, missing = [], []
    for r in rows:
        for key, v in r["ei"].items():
            if not key.startswith(_PAIRED):
                continue
            if key.endswith(_PAIRED_NOTES) and isinstance(v, str) and v:
                base, _, kind = key.rpartition("_")
                missing.append((r, base, kind, v))
            elif not key.endswith(_PAIRED_QUALIFIERS + _PAIRED_NOTES) and \
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v:
                found.append((r, key, v))
    keys = [key for _, key, _ in found] + [key for _, key, _, _ in missing]

    def who(r, key):  # several rows paired against the same peer (two kernel backends): name it
        return f"{r['contender']} " if keys.count(key) > 1 else ""

    def peer(key):
        return PAIRED_PEERS.get(key[len(_PAIRED):], key[len(_PAIRED):])
    def at(r, key):  # the latent a fewer-frames pair ran at
        lat = r["ei"].get("paired_latent")
        return f" (latent {'x'.join(map(str, lat))})" if lat and key.endswith("_fewer_frames") else ""
    paired = [f"{who(r, key)}vs {peer(key)}{at(r, key)} **{v:.2f}x** "
              f"[{r['ei'].get(key + '_min', v):.2f}-{r['ei'].get(key + '_max', v):.2f}]"
              for r, key, v in found]
    if paired:
        n = next((r["ei"].get("paired_pairs") for r in rows if r["ei"].get("paired_pairs")), "?")
        out += ["", f"Speedup timed in interleaved pairs in one process (median [min-max] of "
                    f"t_peer / t_ours over {n} pair{'' if n == 1 else 's'}): "
                    + ", ".join(paired) + "."]
    notes = [f"{who(r, key)}vs {peer(key)}: {kind} ({why})" for r, key, kind, why in missing]
    notes += [f"{r['contender']}: output check skipped ({r['ei']['check_skipped']})"
              for r in rows if isinstance(r["ei"].get("check_skipped"), str)]
    if notes:
        out += ["", "Not measured: " + "; ".join(notes) + "."]
    return "\n".join(out)


QUICK_NOTE = ("**Quick mode** (`--quick`: one small shape, a few rounds, paired ratios from one "
              "or two pairs): a smoke test of the benchmark code, not a measurement; do not quote "
              "these numbers.")


def is_quick(groups) -> bool:
    """Whether any case of ``groups`` ran in ``--quick`` mode."""
    return any((b.get("extra_info") or {}).get("quick") for bs in groups.values() for b in bs)


def summarize(path: str, sort: str = "order") -> str:
    data, groups = load(path)
    parts = [QUICK_NOTE] if is_quick(groups) else []
    mi = data.get("machine_info") or {}
    when = data.get("datetime")
    if mi or when:
        cpu = (mi.get("cpu") or {}).get("brand_raw")
        parts.append(" · ".join(str(x) for x in (when, mi.get("node"), cpu,
                                                 mi.get("python_version") and
                                                 f"Python {mi.get('python_version')}") if x))
    if not groups:
        parts.append("(no benchmarks in file)")
    for g, benches in groups.items():
        parts.append(table(g, benches, sort))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="file written by pytest --benchmark-json")
    ap.add_argument("--sort", choices=("order", "median"), default="order",
                    help="row order: kernel backends, torch.compile, reference, copy (default) "
                         "or fastest first")
    ap.add_argument("--out", help="also write the markdown to this file")
    a = ap.parse_args(argv)
    text = summarize(a.json, a.sort)
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
