"""Run the benchmark suite and render the performance report: ``python -m vidgen_kernels.bench``.

Usage::

    python -m vidgen_kernels.bench                        # every benchmark, full sizes
    python -m vidgen_kernels.bench --quick                # smoke run: one small shape, few rounds
    python -m vidgen_kernels.bench --quick -k adaln --out /tmp/bench
    python -m vidgen_kernels.bench --bench-device cuda -- --wait-quiet 30 -x

What it writes into ``--out DIR`` (default ``./vidgen-bench``):

* ``bench.json``: pytest-benchmark's JSON (``--benchmark-json``; ``--json PATH`` puts it elsewhere);
* ``summary.md``: one markdown table per benchmark group (median, GB/s or GFLOP/s, speedups vs the
  eager reference and ``torch.compile``, fraction of the copy bandwidth); also printed;
* ``REPORT.md`` plus one PNG plot per op and device (the plots need matplotlib);
* ``.benchmarks/``: pytest-benchmark's storage folder (``--benchmark-autosave`` runs).

Options: ``--quick``, ``-k EXPR`` (pytest's case filter, e.g. ``-k "adaln and not compile"``),
``--bench-device {auto,all,cpu,cuda}``. Everything after ``--``, and any option not listed here, is
passed to pytest unchanged: the suite's ``--wait-quiet SECONDS`` and ``--system-malloc``,
pytest-benchmark's ``--benchmark-*`` options, ``-x``, ``-v``, ...

The suite is the source tree's ``benchmarks/`` folder, installed with the package as
``vidgen_kernels._bench_suite``; run from a checkout, the checkout's ``benchmarks/`` is used
(``make bench`` calls this module). It needs pytest and pytest-benchmark, plus matplotlib for the
plots (``pip install "vidgen-kernels[bench]"``). pytest runs in a subprocess with the suite as its
root and an empty configuration, so a ``pytest.ini``/``pyproject.toml``/``conftest.py`` of the
current directory or of a project around the install is not read, and nothing is written next to
the installed suite (no cache, no bytecode).

Exit status: pytest's (non-zero when a case failed, or when ``-k`` selected nothing); the summary
and the report are still rendered from whatever the JSON holds.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

SUITE_PACKAGE = "vidgen_kernels._bench_suite"
# files that identify the benchmark suite folder
SUITE_FILES = ("conftest.py", "common.py", "summarize.py", "report.py")
DEFAULT_OUT = "vidgen-bench"


def _is_suite(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in SUITE_FILES)


def find_suite(package_dir: str | None = None) -> str:
    """Absolute path of the benchmark suite folder.

    ``package_dir`` is the ``vidgen_kernels`` package folder (default: this module's). Looked up in
    order: ``<package_dir>/_bench_suite`` (an installed package), ``<package_dir>/../benchmarks``
    (a source tree), then, only when ``package_dir`` is not given, wherever the import system
    finds ``vidgen_kernels._bench_suite`` (editable installs). Raises FileNotFoundError when none
    holds the suite."""
    explicit = package_dir is not None
    package_dir = os.path.abspath(package_dir or os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.path.join(package_dir, "_bench_suite"),
                  os.path.join(os.path.dirname(package_dir), "benchmarks")]
    for folder in candidates:
        if _is_suite(folder):
            return folder
    spec = None
    if not explicit:
        try:
            spec = importlib.util.find_spec(SUITE_PACKAGE)
        except ImportError:
            pass
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if _is_suite(folder):
            return os.path.abspath(folder)
    raise FileNotFoundError(
        f"vidgen_kernels.bench: the benchmark suite was not found (looked in {', '.join(candidates)} "
        f"and for the module {SUITE_PACKAGE}); reinstall vidgen-kernels, or run from a checkout")


def _load(suite: str, name: str):
    """Module ``name`` (summarize, report) of the suite, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"_vidgen_bench_{name}",
                                                  os.path.join(suite, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(our options, the arguments for pytest)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(
        prog="python -m vidgen_kernels.bench", allow_abbrev=False,
        description="Run the vidgen-kernels benchmark suite (pytest-benchmark) and write "
                    "bench.json, summary.md and REPORT.md with plots.",
        epilog="Arguments after --, and options not listed above, go to pytest unchanged "
               "(e.g. --wait-quiet 30, --system-malloc, --benchmark-*, -x, -v).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one small shape per op and few rounds")
    ap.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                    help=f"folder for bench.json, summary.md, REPORT.md and the plots "
                         f"(default: ./{DEFAULT_OUT})")
    ap.add_argument("--json", metavar="PATH",
                    help="where pytest-benchmark writes its JSON (default: DIR/bench.json)")
    ap.add_argument("-k", dest="keyword", metavar="EXPR",
                    help="pytest -k expression selecting cases, e.g. 'adaln and not compile'")
    ap.add_argument("--bench-device", choices=("auto", "all", "cpu", "cuda"),
                    help="devices to benchmark (suite default: auto = cpu, plus cuda when visible)")
    ns, unknown = ap.parse_known_args(argv)
    return ns, unknown + passthrough


def pytest_command(suite: str, json_path: str, ns: argparse.Namespace, extra: list[str],
                   out: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", suite,
           # our own root and an empty ini: nothing of the caller's project configuration
           "--rootdir", suite, "--confcutdir", suite, "-c", os.devnull,
           # never parallel: under xdist pytest-benchmark disables itself
           "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "--benchmark-json", json_path]
    if out is not None:
        # pytest-benchmark always creates its storage folder (default ./.benchmarks); keep it in
        # the output folder (--benchmark-autosave runs land there; extra args may override it)
        cmd += ["--benchmark-storage", "file://" + os.path.join(out, ".benchmarks")]
    if ns.quick:
        cmd.append("--quick")
    if ns.keyword:
        cmd += ["-k", ns.keyword]
    if ns.bench_device:
        cmd += ["--bench-device", ns.bench_device]
    return cmd + extra


REPORT_TITLE = "# vidgen-kernels performance report"  # report.py's first line


def previous_report(out: str) -> list[str]:
    """The files a previous run's report left in ``out``: its ``REPORT.md`` (recognised by its
    title), the plots it links and the ``summary.md`` beside it; nothing when ``out`` holds no
    such report (a folder of the user's own files keeps them)."""
    report = os.path.join(out, "REPORT.md")
    try:
        with open(report) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    if not text.startswith(REPORT_TITLE):
        return []
    names = set(re.findall(r"\]\(([A-Za-z0-9_.-]+\.png)\)", text)) | {"summary.md"}
    return [report] + [os.path.join(out, n) for n in sorted(names)
                       if os.path.isfile(os.path.join(out, n))]


def main(argv: list[str] | None = None) -> int:
    ns, extra = parse_args(argv)
    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"vidgen_kernels.bench: needs {' and '.join(missing)}: "
              "pip install pytest pytest-benchmark (matplotlib too, for the plots)", file=sys.stderr)
        return 2
    try:
        suite = find_suite()
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    out = os.path.abspath(ns.out)
    json_path = os.path.abspath(ns.json or os.path.join(out, "bench.json"))
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"vidgen_kernels.bench: --out {ns.out} is a file, not a folder", file=sys.stderr)
        return 2
    if os.path.isdir(json_path):
        print(f"vidgen_kernels.bench: --json {ns.json} is a folder; give a file path", file=sys.stderr)
        return 2
    try:
        os.makedirs(out, exist_ok=True)
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    except OSError as e:
        print(f"vidgen_kernels.bench: cannot create the output folders: {e}", file=sys.stderr)
        return 2
    for path in [json_path] + previous_report(out):  # never report a previous run's numbers
        if os.path.isfile(path):
            os.remove(path)

    cmd = pytest_command(suite, json_path, ns, extra, out)
    print(f"vidgen_kernels.bench: suite {suite}", flush=True)
    print("vidgen_kernels.bench: " + " ".join(cmd[1:]), flush=True)
    # no __pycache__ next to the suite; no PYTEST_XDIST_* of a caller that is an xdist worker
    # (pytest-benchmark would take the run for one and disable itself)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    rc = subprocess.call(cmd, env=env)

    if not os.path.isfile(json_path) or os.path.getsize(json_path) == 0:
        print(f"vidgen_kernels.bench: pytest exited with {rc} and wrote no {json_path}; "
              "no report", file=sys.stderr)
        return rc or 1
    summary_md = os.path.join(out, "summary.md")
    _load(suite, "summarize").main([json_path, "--out", summary_md])
    _load(suite, "report").main([json_path, "--out", out])
    if importlib.util.find_spec("matplotlib") is None:
        print("vidgen_kernels.bench: matplotlib is not installed: REPORT.md has the tables, "
              "no plots")
    print(f"vidgen_kernels.bench: {json_path}, {summary_md}, {os.path.join(out, 'REPORT.md')}")
    if rc:
        print(f"vidgen_kernels.bench: pytest exited with {rc} (failed or no selected cases)",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
