#!/usr/bin/env python
"""Merge pytest-benchmark JSON files (``--benchmark-json``) into one.

    python benchmarks/merge_json.py a.json b.json ... --out merged.json

The ``benchmarks`` lists are concatenated in the order given; ``machine_info``, ``commit_info``
and ``version`` come from the first readable file, ``datetime`` from the last. The merged file
lists its sources under ``merged_from``. A file that is missing, empty or not valid JSON (a run
killed before pytest-benchmark wrote it) is skipped with a warning on stderr; exit status 1 if
no file could be read. Standard library only (no torch import).
"""
from __future__ import annotations

import argparse
import json
import sys


def merge(paths: list[str]) -> dict | None:
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
        out["benchmarks"].extend(benches)
        out["merged_from"].append(path)
        if "datetime" in data:
            out["datetime"] = data["datetime"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    ap.add_argument("--out", required=True, help="the merged file")
    a = ap.parse_args(argv)
    merged = merge(a.json)
    if merged is None:
        print("merge_json: no readable benchmark JSON among the inputs", file=sys.stderr)
        return 1
    with open(a.out, "w") as f:
        json.dump(merged, f, indent=2)
    print(f"merge_json: {len(merged['benchmarks'])} benchmarks from {len(merged['merged_from'])} "
          f"files -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
