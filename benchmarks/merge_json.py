#!/usr/bin/env python
"""Merge pytest-benchmark JSON files (``--benchmark-json``) into one.

    python benchmarks/merge_json.py a.json b.json ... --out merged.json

The ``benchmarks`` lists are concatenated in the order given; ``machine_info``, ``commit_info``
and ``version`` come from the first readable file, ``datetime`` from the last; each case's
``extra_info`` gets ``machine_node`` (its file's node). The merged file lists its sources under
``merged_from``. A file that is missing, empty or not valid JSON (a run
killed before pytest-benchmark wrote it) is skipped with a warning on stderr; exit status 1 if
no file could be read. Files from different machines (``machine_info`` node or CPU) are refused
with exit status 2: their rows would land in the same tables and their speedups compare one
machine with the other. ``--allow-mixed`` merges them anyway (with a warning; ``summarize.py``
then splits a group measured on several machines or devices by both). Standard library only (no torch
import).
"""
from __future__ import annotations

import argparse
import json
import sys


def machine(data: dict) -> tuple:
    """What identifies the machine a file was measured on: (node, CPU), None where the file
    does not say; and, for the message, the device names of its cases (one machine's files may
    hold different devices: its GPU cases in one, its CPU cases in another)."""
    mi = data.get("machine_info") or {}
    devs = sorted({(b.get("extra_info") or {}).get("device_name") for b in data["benchmarks"]
                   if isinstance(b, dict)} - {None})
    return (mi.get("node"), (mi.get("cpu") or {}).get("brand_raw"), tuple(devs) or None)


def mixed(machines: list[tuple]) -> bool:
    """True when two files disagree on the node or the CPU, where both state it."""
    for i in range(2):
        seen = {m[i] for m in machines if m[i] is not None}
        if len(seen) > 1:
            return True
    return False


def merge(paths: list[str], machines: list | None = None) -> dict | None:
    out = None
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            benches = data["benchmarks"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"merge_json: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if out is None:
            out = {k: v for k, v in data.items() if k != "benchmarks"}
            out["benchmarks"], out["merged_from"] = [], []
        node = (data.get("machine_info") or {}).get("node")
        for b in benches:  # each case keeps its machine (machine_info is the first file's)
            if isinstance(b, dict) and isinstance(b.get("extra_info"), dict) and node:
                b["extra_info"].setdefault("machine_node", node)
        out["benchmarks"].extend(benches)
        out["merged_from"].append(path)
        if machines is not None:
            machines.append(machine(data))
        if "datetime" in data:  # the run's start: the earliest file's (ISO strings sort)
            out["datetime"] = min(out.get("datetime") or data["datetime"], data["datetime"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    ap.add_argument("--out", required=True, help="the merged file")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="merge files measured on different machines / devices (warns)")
    a = ap.parse_args(argv)
    machines: list = []
    merged = merge(a.json, machines)
    if merged is None:
        print("merge_json: no readable benchmark JSON among the inputs", file=sys.stderr)
        return 1
    if mixed(machines):
        desc = "; ".join(f"{p}: node {m[0]}, cpu {m[1]}, devices {', '.join(m[2] or ('?',))}"
                         for p, m in zip(merged["merged_from"], machines))
        if not a.allow_mixed:
            print(f"merge_json: the files come from different machines ({desc}); their rows would "
                  f"share tables. Pass --allow-mixed to merge them anyway", file=sys.stderr)
            return 2
        print(f"merge_json: warning: merging different machines ({desc})", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(merged, f, indent=2)
    print(f"merge_json: {len(merged['benchmarks'])} benchmarks from {len(merged['merged_from'])} "
          f"files -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
