"""``python -m vidgen_kernels.bench``: the benchmark suite ships with the package, is found in
both layouts (installed / source tree), and a quick filtered run writes bench.json, summary.md
and REPORT.md."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import vidgen_kernels as vk
from vidgen_kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where this test process imported vidgen_kernels from (checkout or site-packages)
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(vk.__file__)))


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _fake_suite(folder):
    os.makedirs(folder)
    for f in bench.SUITE_FILES:
        with open(os.path.join(folder, f), "w") as fh:
            fh.write("\n")
    return str(folder)


def test_find_suite_default():
    suite = bench.find_suite()
    assert os.path.isfile(os.path.join(suite, "test_bench_adaln.py")), suite
    # the checkout's benchmarks/ or an installed package's _bench_suite
    assert suite in (os.path.join(ROOT, "benchmarks"), os.path.join(
        os.path.dirname(os.path.abspath(bench.__file__)), "_bench_suite")), suite


def test_find_suite_layouts(tmp_path):
    pkg = tmp_path / "site" / "vidgen_kernels"
    pkg.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        bench.find_suite(str(pkg))
    # a source tree: <root>/vidgen_kernels next to <root>/benchmarks
    tree = _fake_suite(tmp_path / "site" / "benchmarks")
    assert bench.find_suite(str(pkg)) == tree
    # an installed package: vidgen_kernels/_bench_suite, preferred
    installed = _fake_suite(pkg / "_bench_suite")
    assert bench.find_suite(str(pkg)) == installed
    # an incomplete folder is not the suite
    os.remove(os.path.join(installed, "report.py"))
    assert bench.find_suite(str(pkg)) == tree


def test_arguments_and_pytest_command():
    ns, extra = bench.parse_args(["--quick", "-k", "adaln", "--wait-quiet", "5", "--out", "o",
                                  "--", "-x", "--quick"])
    assert ns.quick and ns.keyword == "adaln" and ns.out == "o" and ns.bench_device is None
    assert extra == ["--wait-quiet", "5", "-x", "--quick"]
    cmd = bench.pytest_command("/suite", "/o/bench.json", ns, extra, "/o")
    assert cmd[:4] == [sys.executable, "-m", "pytest", "/suite"]
    joined = " ".join(cmd)
    for part in ("--rootdir /suite", "--confcutdir /suite", f"-c {os.devnull}",
                 "-p no:cacheprovider", "-p no:xdist", "--benchmark-json /o/bench.json", "-k adaln",
                 "--benchmark-storage file:///o/.benchmarks"):
        assert part in joined, (part, cmd)
    assert cmd[-4:] == extra  # after ours: a pytest option given twice takes the last value
    assert bench.parse_args([])[0].out == bench.DEFAULT_OUT


def test_bad_output_paths_give_a_message_not_a_traceback(tmp_path, capsys):
    """``--out`` naming a file and ``--json`` naming a folder: exit 2 with a message naming the
    option (FileExistsError / IsADirectoryError tracebacks before)."""
    f = tmp_path / "a_file"
    f.write_text("")
    assert bench.main(["--out", str(f), "--quick"]) == 2
    assert f"--out {f} is a file" in capsys.readouterr().err
    assert bench.main(["--out", str(tmp_path / "o"), "--json", str(tmp_path), "--quick"]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "setup.py")), reason="not a source tree")
def test_suite_ships_in_package(tmp_path):
    """setup.py's build_py (what a wheel gets; copies Python files, compiles nothing) puts
    benchmarks/*.py into vidgen_kernels/_bench_suite and nothing else from benchmarks/; there,
    find_suite() finds it."""
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                        "build_py", "-d", str(lib)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, VIDGEN_KERNELS_NO_EXT="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    shipped = lib / "vidgen_kernels" / "_bench_suite"
    want = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
    assert "conftest.py" in want and "test_bench_adaln.py" in want
    assert sorted(os.listdir(shipped)) == want  # no results/, report/, last.json, README, gpu.sh
    assert (lib / "vidgen_kernels" / "bench.py").is_file()

    # installed layout: python -m vidgen_kernels.bench would use the shipped copy
    r = subprocess.run([sys.executable, "-c", "from vidgen_kernels import bench; "
                        "print(bench.find_suite())"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(lib)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(shipped)


def test_cli_quick_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a previous run's report (its title, a plot it links, its summary) and a user's own image
    (out / "REPORT.md").write_text("# vidgen-kernels performance report\n\n![x](old-op-cpu.png)\n")
    for name in ("summary.md", "old-op-cpu.png", "my-figure.png"):
        (out / name).write_text("previous run")
    # one small file, without torch.compile contenders and backward (well under a minute on CPU)
    r = subprocess.run([sys.executable, "-m", "vidgen_kernels.bench", "--quick", "--out", str(out),
                        "-k", "adaln and not compile and not bwd", "--bench-device", "cpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    data = json.loads((out / "bench.json").read_text())
    benches = data["benchmarks"]
    assert benches, data
    ops = {b["extra_info"]["op"] for b in benches}
    assert ops <= {"adaln_modulate", "gated_residual_adaln"} and ops, ops
    assert all(b["extra_info"]["contender"] != "torch.compile" for b in benches)

    summary = (out / "summary.md").read_text()
    assert "### adaln_modulate fwd" in summary and summary in r.stdout
    # a quick run says it is one (its paired ratios, from one pair, looked like results)
    assert all(b["extra_info"]["quick"] is True for b in benches)
    assert summary.startswith("**Quick mode**") and "not a measurement" in summary

    report = (out / "REPORT.md").read_text()
    device = benches[0]["extra_info"]["device_name"]
    assert f"* devices: {device}" in report, report[:800]
    assert "## adaln_modulate (cpu)" in report and "## gated_residual_adaln (cpu)" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "adaln-modulate-cpu.png").is_file()
        assert "](adaln-modulate-cpu.png)" in report
    assert "* dtypes: float32; torch threads: " in report, report[:800]
    assert "**Quick mode**" in report, report[:1500]
    assert not (out / "old-op-cpu.png").exists()  # a previous run's plot is not left beside it
    assert (out / "my-figure.png").read_text() == "previous run"  # a file the report never wrote
    (out / "my-figure.png").unlink()
    # nothing but the output folder was written (pytest-benchmark's storage folder included)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # a run that writes no JSON leaves no report: the previous one's was still there
    r = subprocess.run([sys.executable, "-m", "vidgen_kernels.bench", "--quick", "--out", str(out),
                        "-k", "no_benchmark_is_named_like_this", "--bench-device", "cpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode != 0 and "no report" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr
    assert not any(f.endswith((".md", ".png", ".json")) for f in os.listdir(out)), os.listdir(out)
    # a REPORT.md that is not ours (no report title) is left with everything beside it
    (out / "REPORT.md").write_text("# my notes\n![a](a.png)\n")
    (out / "a.png").write_text("mine")
    assert bench.previous_report(str(out)) == []


def _suite_module(name):
    path = os.path.join(ROOT, "benchmarks", name + ".py")
    if not os.path.isfile(path):
        pytest.skip("benchmarks/ source folder not present (installed layout)")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f"_vk_bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


def test_paired_speedup_and_summary_line():
    """Interleaved-pair timing: a call twice as slow as ours reads ~2x, and the summary prints
    the pair medians under the table."""
    import time
    common = _suite_module("common")
    r = common.paired_speedup(lambda: time.sleep(0.004), lambda: time.sleep(0.012), "cpu", 5,
                              "paired_vs_reference")
    assert r["paired_pairs"] == 5
    assert r["paired_vs_reference_min"] <= r["paired_vs_reference"] <= r["paired_vs_reference_max"]
    assert 1.8 < r["paired_vs_reference"] < 4.5, r
    assert common.paired_speedup(lambda: None, lambda: None, "cpu", 0, "k")["k"] is None

    summarize = _suite_module("summarize")
    ei = dict(contender="fused", bytes_moved=None, paired_vs_reference=1.5,
              paired_vs_reference_min=1.4, paired_vs_reference_max=1.6, paired_pairs=8)
    benches = [{"name": "a", "stats": {"median": 0.3}, "extra_info": ei},
               {"name": "b", "stats": {"median": 0.45},
                "extra_info": dict(contender="reference", bytes_moved=None)}]
    text = summarize.table("dit_block x train", benches)
    assert "t_peer / t_ours over 8 pairs): vs eager reference **1.50x** [1.40-1.60]." in text, text
    assert "pairs" not in summarize.table("dit_block x train", benches[1:])
    # any paired_vs_<peer> key is printed, with the peer's name; two rows paired against the
    # same peer are told apart by their contender
    two = [{"name": n, "stats": {"median": 0.2},
            "extra_info": dict(contender=n, bytes_moved=None, paired_vs_dense=v,
                               paired_vs_dense_min=v, paired_vs_dense_max=v, paired_pairs=4,
                               paired_vs_sdpa=0.9)}
           for n, v in (("cpu", 0.95), ("triton", 1.25))]
    text = summarize.table("moe x", two)
    assert "cpu vs the dense FFN **0.95x** [0.95-0.95]" in text, text
    assert "triton vs the dense FFN **1.25x**" in text, text
    assert "cpu vs SDPA alone **0.90x** [0.90-0.90]" in text, text
    # the calls per timed batch (paired_vs_<peer>_reps, 1..200 on CUDA) are a count, not a
    # speedup: it was printed as "vs reference_reps **37.00x**"; a peer that could not run and
    # a skipped output check leave their reasons
    ei = dict(ei, paired_vs_reference_reps=37, paired_vs_compile_skipped="needs 35.2 GiB, 20.1 free",
              check_skipped="not even one frame fits")
    text = summarize.table("dit_block x train", [dict(benches[0], extra_info=ei)] + benches[1:])
    assert "reps" not in text and "37" not in text, text
    assert "vs eager reference **1.50x** [1.40-1.60]." in text, text
    assert ("Not measured: vs torch.compile: skipped (needs 35.2 GiB, 20.1 free); fused: output "
            "check skipped (not even one frame fits).") in text, text


def test_block_pairs_at_fewer_frames_where_the_reference_does_not_fit(monkeypatch):
    """test_bench_block: where the eager reference step does not fit at the case's frame count
    (CogVideoX at 17,776 tokens on a GPU), the fused-vs-reference pairs run at the largest of
    half, a quarter ... of the frames that fits, and the summary names that latent. Here the
    memory check is replaced: 4 frames 'do not fit', 2 do (the --quick CPU size of the case)."""
    blk = _suite_module("test_bench_block")
    case = blk.Case(model="video_causal_dit", direction="train", size=blk.SIZES[("cpu", True)][0],
                    device="cpu", dtype=torch.float32, contender=blk.FUSED)
    lat = case.size[2]
    asked = []

    def no_room(what, need, device):
        asked.append(what)
        return "too big" if "at 4 frame" in what else None
    monkeypatch.setattr(blk, "no_room", no_room)
    big = blk.Case(**{**case.__dict__, "size": (*case.size[:2], (1, 8, *lat[2:]), *case.size[3:])})
    model = blk.build(big)
    got = blk.paired_at_fewer_frames(big, model, quick=True)
    assert got["paired_latent"] == [1, 2, *lat[2:]], got
    assert got[blk.FEWER] > 0 and got["paired_pairs"] == 1, got
    assert asked == ["the eager reference peer at 4 frame(s)", "the eager reference peer at 2 frame(s)"]
    assert model.backend is None  # the fused model is left on its default backend
    summarize = _suite_module("summarize")
    ei = dict(contender="fused", bytes_moved=None, **got)
    text = summarize.table("dit_block x train", [{"name": "f", "stats": {"median": 0.3}, "extra_info": ei}])
    assert "vs eager reference, both at fewer frames (latent 1x2x16x16x16) **" in text, text
    # not even one frame fits: a note, no figure
    monkeypatch.setattr(blk, "no_room", lambda what, need, device: "too big")
    assert blk.paired_at_fewer_frames(big, model, quick=True) == {blk.FEWER + "_skipped": "too big"}


def test_best_peer_leaves_out_ours_and_the_bounds():
    """"vs best peer" is the fastest peer's median over the row's: our own contenders (kernel
    backends, the fused model, the patched diffusers model, compiled or not) and the bounds (copy; SDPA without
    the rotation for rope3d_attention; the dense FFN for the MoE) are not peers (the fused model
    used to be its own best peer: 1.00x); a paired error string does not crash the summary."""
    summarize = _suite_module("summarize")

    def rows(op, times):
        return [{"name": c, "stats": {"median": m},
                 "extra_info": dict(op=op, contender=c, bytes_moved=None)} for c, m in times]

    def best_peer_cell(text, contender):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {contender} |"))
        return line.split("|")[6].strip()
    text = summarize.table("dit_block x", rows("dit_block", [("fused", 0.2), ("reference", 0.3),
                                                              ("torch.compile", 0.25)]))
    assert best_peer_cell(text, "fused") == "1.25x", text
    text = summarize.table("rope3d_attention x", rows("rope3d_attention", [
        ("cpu", 0.2), ("sdpa", 0.1), ("rotate+sdpa", 0.22), ("copy", 0.01), ("reference", 0.5)]))
    assert best_peer_cell(text, "cpu") == "1.10x", text
    text = summarize.table("moe_ffn x", rows("moe_ffn", [("cpu", 0.2), ("dense", 0.1),
                                                          ("grouped_mm", 0.3)]))
    assert best_peer_cell(text, "cpu") == "1.50x", text
    # every peer by name under the table (the bounds too, the copy, reference, compile not)
    assert "Speedup vs each peer (its median / this one's): cpu: vs dense 0.50x, vs grouped_mm " \
           "1.50x." in text, text
    # diffusers: the compiled patched model is ours too; the compiled unpatched one is a peer
    text = summarize.table("diffusers x", rows("diffusers", [
        ("diffusers", 0.4), ("patched", 0.35), ("torch.compile", 0.3),
        ("patched+torch.compile", 0.2)]))
    assert best_peer_cell(text, "patched+torch.compile") == "1.50x", text
    assert best_peer_cell(text, "patched") == "0.86x", text
    err = rows("rope3d_attention", [("cpu", 0.2), ("sdpa", 0.1)])
    err[0]["extra_info"]["paired_vs_sdpa_error"] = "RuntimeError: out of memory"
    text = summarize.table("rope3d_attention x", err)  # the reason is said, not a speedup
    assert "Not measured: vs SDPA alone: error (RuntimeError: out of memory)." in text, text
    assert "interleaved pairs" not in text, text
    # a case that failed after its timing (no metadata) is listed as incomplete, not a peer:
    # it was the best "peer" of the kernel's row (1.00x, compared with itself)
    text = summarize.table("dit_block x", rows("dit_block", [("fused", 0.2), ("reference", 0.3)])
                           + [{"name": "test_block[fused-x]", "stats": {"median": 0.2}}])
    assert best_peer_cell(text, "fused") == "1.50x", text
    assert "| test_block[fused-x] (incomplete: no metadata) |" in text, text


def test_flop_rate_against_matmul_peak_and_peak_memory(tmp_path):
    """FLOP rates are set against the measured matmul peak of the same device and dtype (a
    column in the tables, a label in the plots, a line in REPORT.md), in TFLOP/s on CUDA and
    GFLOP/s elsewhere; CUDA peak memory (peak_mem_bytes) gets a column beside the activation
    memory."""
    common, summarize, report = (_suite_module(m) for m in ("common", "summarize", "report"))
    peak = common.matmul_peak_flops("cpu", torch.float32)
    assert peak > 1e8 and common.matmul_peak_flops("cpu", torch.float32) == peak  # measured once

    def row(contender, median, device="cpu", **ei):
        return {"name": contender, "stats": {"median": median},
                "extra_info": dict(op="moe_ffn", contender=contender, bytes_moved=None,
                                   device=device, device_name="X", dtype="float32", **ei)}
    text = summarize.table("moe x", [row("cpu", 0.01, flops=2e9, matmul_peak_flops=4e11),
                                     row("reference", 0.02, flops=2e9, matmul_peak_flops=4e11)])
    head = next(ln for ln in text.splitlines() if ln.startswith("| contender"))
    assert "| GFLOP/s | of matmul peak |" in head, text
    assert "| cpu | 10.000 | – | 200.0 | 50% |" in text, text
    text = summarize.table("moe x", [row("triton", 0.001, "cuda", flops=4e11, matmul_peak_flops=8e14,
                                         peak_mem_bytes=3 * 2**20),
                                     row("reference", 0.002, "cuda", flops=4e11,
                                         matmul_peak_flops=8e14, peak_mem_bytes=6 * 2**20)])
    assert "| TFLOP/s | of matmul peak |" in text and "| 400 | 50% |" in text, text
    assert "peak MiB (vs ref) |" in text and "| 3.0 (0.50x) |" in text, text
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        dict(row("cpu", 0.01, flops=2e9, matmul_peak_flops=4e11), group="moe x")]}))
    out = report.render(str(path), str(tmp_path / "r"))
    assert "* matmul peak (a large square `torch.mm`" in out and "X float32 400 GFLOP/s" in out, out


def test_paired_batches_time_every_call_of_the_batch():
    """The batch timer behind the CUDA pairs (several calls per side, one sync): per-call time
    of a batch, on the CPU path here."""
    import time
    common = _suite_module("common")
    calls = []

    def f():
        calls.append(1)
        time.sleep(0.002)
    t = common._time_batch(f, "cpu", 5)
    assert len(calls) == 5 and 0.0018 < t < 0.02, t
    r = common.paired_speedup(f, f, "cpu", 2, "k")
    assert r["k_reps"] == 1 and r["paired_pairs"] == 2


def _bench_json(path, names):
    with open(path, "w") as f:
        json.dump({"machine_info": {"node": "x"}, "commit_info": {}, "version": "5",
                   "datetime": f"t-{names[0]}",
                   "benchmarks": [{"name": n, "stats": {"median": 1.0}} for n in names]}, f)
    return str(path)


def test_merge_json(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import merge_json
    finally:
        sys.path.pop(0)
    a = _bench_json(tmp_path / "a.json", ["a1", "a2"])
    b = _bench_json(tmp_path / "b.json", ["b1"])
    broken = tmp_path / "broken.json"
    broken.write_text('{"benchmarks": [')  # a run killed while writing
    out = tmp_path / "m.json"
    assert merge_json.main([a, str(broken), b, str(tmp_path / "missing.json"), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert [x["name"] for x in m["benchmarks"]] == ["a1", "a2", "b1"]
    assert m["merged_from"] == [a, b] and m["machine_info"] == {"node": "x"}
    # the run's start, the earliest file's (it was the last file's: gpu.sh's tiles family)
    assert m["datetime"] == "t-a1"
    assert merge_json.main([b, a, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["datetime"] == "t-a1"
    err = capsys.readouterr().err
    assert "skipping" in err and "broken.json" in err and "missing.json" in err
    assert merge_json.main([str(broken), "--out", str(tmp_path / "none.json")]) == 1


def test_merge_and_summary_keep_machines_apart(tmp_path, capsys):
    """Files from different machines are refused by merge_json (exit 2 naming them) unless
    --allow-mixed; then summarize splits each group by device (machine B's rows landed in machine
    A's tables, and the speedups compared one machine with the other: 4.25x read 8.50x).
    Unreadable files give a one-line exit, not a traceback."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import merge_json
    finally:
        sys.path.pop(0)
    summarize = _suite_module("summarize")

    def run(path, node, dev, t_cpu, t_ref, cpu="EPYC"):
        rows = [{"name": c, "group": "adaln x", "stats": {"median": m},
                 "extra_info": dict(op="adaln", contender=c, bytes_moved=None, device_name=dev)}
                for c, m in (("cpu", t_cpu), ("reference", t_ref))]
        path.write_text(json.dumps({"machine_info": {"node": node, "cpu": {"brand_raw": cpu}},
                                    "benchmarks": rows}))
        return str(path)
    a = run(tmp_path / "a.json", "vm", "EPYC", 1.0, 4.25)
    b = run(tmp_path / "b.json", "box", "Xeon", 2.0, 8.5)
    out = str(tmp_path / "m.json")
    assert merge_json.main([a, b, "--out", out]) == 2
    assert "different machines" in capsys.readouterr().err and not os.path.exists(out)
    assert merge_json.main([a, a, "--out", out]) == 0  # the same machine twice: fine
    g = run(tmp_path / "g.json", "vm", "H100", 1.0, 2.0)  # its GPU's cases: the same machine
    assert merge_json.main([a, g, "--out", out]) == 0
    assert merge_json.main([a, run(tmp_path / "c.json", "vm", "EPYC", 1.0, 2.0, cpu="Xeon"),
                            "--out", out]) == 2  # same node name, another CPU
    assert merge_json.main([a, b, "--out", out, "--allow-mixed"]) == 0
    assert "warning" in capsys.readouterr().err
    text = summarize.summarize(out)
    assert "### adaln x [EPYC on vm]" in text and "### adaln x [Xeon on box]" in text, text
    assert text.count("| cpu | 1000.000 | – | 4.25x |") == 1, text  # each machine against itself
    assert text.count("| cpu | 2000.000 | – | 4.25x |") == 1 and "8.50x" not in text, text
    # the same device name on two machines (two VMs of one type) is split by machine too
    b2 = run(tmp_path / "b2.json", "vm-2", "EPYC", 2.0, 8.5)
    assert merge_json.main([a, b2, "--out", out, "--allow-mixed"]) == 0
    text = summarize.summarize(out)
    assert "### adaln x [EPYC on vm]" in text and "### adaln x [EPYC on vm-2]" in text, text
    assert "8.50x" not in text, text
    (tmp_path / "zero.json").write_text("")
    (tmp_path / "list.json").write_text("[]")
    for bad, msg in (("zero.json", "cannot read"), ("list.json", "is not a pytest-benchmark JSON")):
        with pytest.raises(SystemExit, match=msg):
            summarize.load(str(tmp_path / bad))


def test_report_sections_by_op_and_device(tmp_path):
    """report.py: one section per (op, device), both read from whichever rows carry them: the
    diffusers rows had no "op" label and their device came out as "device unknown", their cpu
    and cuda groups sharing one section and one plot."""
    report = _suite_module("report")
    rows = []
    for dev in ("cpu", "cuda"):
        for c, m, op in (("patched", 1.0, "diffusers"), ("unpatched", 1.5, None)):
            ei = dict(contender=c, device=dev)
            if op:
                ei["op"] = op
            rows.append({"name": c, "group": f"diffusers cogvideox fwd {dev}", "stats": {"median": m},
                         "extra_info": ei})
    # a JSON written before the diffusers rows carried "op" (benchmarks/results/cpu-2026-12-06)
    rows += [{"name": c, "group": "diffusers wan fwd cuda", "stats": {"median": 1.0},
              "extra_info": dict(contender=c, device="cuda")} for c in ("patched", "unpatched")]
    rows.append({"name": "cut", "group": "adaln x cpu", "stats": {"median": 1.0}, "extra_info": {}})
    rows.append({"name": "cpu", "group": "adaln x cpu", "stats": {"median": 1.0},
                 "extra_info": dict(op="adaln", contender="cpu", device="cpu")})
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    keys = list(report._by_op(groups))
    assert keys == [("diffusers", "cpu"), ("diffusers", "cuda"), ("adaln", "cpu")], keys
    assert len(report._by_op(groups)[("diffusers", "cuda")]) == 2  # both cuda groups
    # an unlabelled group: its name's first word, the device unknown
    assert list(report._by_op({"rope x": [{"name": "a", "extra_info": {}}]})) == \
        [("rope", "device unknown")]


def _gpu_sh(*args, env=None, timeout=120):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_gpu_sh_plan_covers_every_benchmark_and_fits_the_budget():
    """benchmarks/gpu.sh --dry-run: the stage caps add up to at most the budget minus the 30 s
    reserve, and the benchmark plan names every benchmarks/test_bench_*.py (a new benchmark file
    must be added to BENCH_PLAN, or the GPU record would silently lack it)."""
    r = _gpu_sh("--dry-run", "--python", sys.executable, "--budget", "540", "build", "test", "bench")
    assert r.returncode == 0, r.stdout + r.stderr
    caps = [int(line.split("cap ")[1].split()[0]) for line in r.stdout.splitlines()
            if ": cap " in line]
    assert len(caps) == 3 and all(c > 0 for c in caps) and sum(caps) <= 540 - 30, r.stdout
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "test_bench_*.py")))
    planned = r.stdout.split("bench rope3d_attention (weight")[1]
    for f in files:
        assert f"benchmarks/{f} -k 'not torch.compile'" in planned, (f, r.stdout)
    # the compile contenders come last, the whole diffusers models' (minutes each) after the rest
    assert planned.index("benchmarks/ -k 'torch.compile and not diffusers'") \
        < planned.index("benchmarks/test_bench_diffusers.py -k 'torch.compile'"), planned
    assert planned.index("-k 'not torch.compile'") < planned.index("-k 'torch.compile and"), planned
    # under a budget, CUDA-marked tests only (the others are CPU tests CI runs); --all-tests adds
    # them, and without a budget the whole suite runs (CUDA-marked first)
    assert "-m 'cuda'" in r.stdout and "not cuda" not in r.stdout, r.stdout
    r = _gpu_sh("--dry-run", "--python", sys.executable, "--budget", "540", "--all-tests", "test")
    assert "-m 'cuda'" in r.stdout and "-m 'not cuda'" in r.stdout, r.stdout
    r = _gpu_sh("--dry-run", "--python", sys.executable, "test")
    assert r.stdout.index("-m 'cuda'") < r.stdout.index("-m 'not cuda'"), r.stdout
    r = _gpu_sh("--dry-run", "--python", sys.executable, "demo")  # only the stages asked for
    assert "tests:" not in r.stdout and "bench " not in r.stdout, r.stdout
    assert _gpu_sh("--budget", "soon").returncode == 2
    assert _gpu_sh("--no-such-option").returncode == 2
    r = _gpu_sh("--dry-run", "--out")  # an option without its value: bad arguments, named
    assert r.returncode == 2 and "--out needs a value" in r.stderr, r.stdout + r.stderr


def test_gpu_sh_rehearsal_writes_and_packs(tmp_path):
    """A CPU rehearsal of the test stage (--allow-cpu, one small test file): logs, the junit XML
    of each selection, stages.txt, and one packed archive holding the folder."""
    import tarfile
    out, pack = tmp_path / "rec", tmp_path / "back" / "rec.tgz"
    r = _gpu_sh("--allow-cpu", "--all-tests", "--python", sys.executable, "--out", str(out),
                "--pack", str(pack), "test", env={"GPU_SH_TEST_PATHS": "tests/test_package.py",
                                                  "GPU_SH_COMMIT": "abc1234"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test: ok" in (out / "stages.txt").read_text()
    assert (out / "tests-not-cuda.xml").is_file() and (out / "env.txt").is_file()
    assert "PASSED" in (out / "tests.log").read_text()
    assert "git: abc1234 (given by GPU_SH_COMMIT)" in (out / "env.txt").read_text()
    with tarfile.open(pack) as t:
        names = t.getnames()
    assert {"rec/stages.txt", "rec/tests.log", "rec/env.txt"} <= set(names), names
    # a second call into the same folder (the recipe's second command) keeps the first's record
    r = _gpu_sh("--allow-cpu", "--python", sys.executable, "--out", str(out), "test",
                env={"GPU_SH_TEST_PATHS": "tests/test_package.py"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "stages.txt").read_text().count("test: ok") == 2
    assert (out / "env.txt").read_text().count("# gpu.sh test") == 2


def test_gpu_sh_tests_failed_before_the_budget_stop_are_a_failure(tmp_path):
    """A test selection that failed a test, then a selection the budget stopped: exit 1 (a
    failure outranks a cut; the cut used to overwrite it, exit 3 "partial, nothing failed"), and
    a cut selection's failures before the stop count too (its junit XML has them)."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text(
        "import time\nimport pytest\n"
        "@pytest.mark.cuda\ndef test_gpu_fails():\n    assert False\n"
        "def test_cpu_fails():\n    assert False\n"
        "def test_cpu_slow():\n    time.sleep(120)\n")
    out = tmp_path / "rec"
    r = _gpu_sh("--allow-cpu", "--all-tests", "--python", sys.executable, "--out", str(out),
                "--budget", "50", "test", env={"GPU_SH_TEST_PATHS": str(tests)}, timeout=180)
    stages = (out / "stages.txt").read_text()
    assert r.returncode == 1 and "test: FAILED (rc 1)" in stages, r.stdout + r.stderr + stages
    # only the cut selection, with a failure before the stop
    out2 = tmp_path / "rec2"
    r = _gpu_sh("--allow-cpu", "--all-tests", "--python", sys.executable, "--out", str(out2),
                "--budget", "50", "test",
                env={"GPU_SH_TEST_PATHS": str(tests / "test_x.py") + " -k cpu"}, timeout=180)
    stages = (out2 / "stages.txt").read_text()
    assert r.returncode == 1 and "test: FAILED (rc 1)" in stages, r.stdout + r.stderr + stages


def test_gpu_sh_help_prints_the_header(tmp_path):
    """-h / --help print the header comment (line 2 up to the first line not starting with '#',
    without the '# ') and exit 0, also when called by a relative path from another folder."""
    with open(os.path.join(ROOT, "benchmarks", "gpu.sh")) as f:
        lines = f.read().splitlines()[1:]
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    assert "Usage: bash benchmarks/gpu.sh [options] [STAGE ...]" in header and len(header) > 20
    for args, cwd in ((["benchmarks/gpu.sh", "--help"], ROOT),
                      (["gpu.sh", "--out", "x", "-h"], os.path.join(ROOT, "benchmarks"))):
        r = subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines() == header, r.stdout[-500:] + r.stderr
        assert "set -uo" not in r.stdout


# Stands in for `python -m pytest benchmarks/[test_bench_<family>.py] ... --benchmark-json=J` in
# gpu.sh rehearsals: FAKE_BENCH="family=mode,..."; mode ok (default: 4 cases), fail (4 cases,
# exit 1), hang (2 cases, then waits for SIGINT; runs through when given --deselect: a second
# pass), stuck (1 case, then waits). Writes pytest-benchmark-like JSON of the cases it ran, also
# when interrupted (exit 2, as pytest).
_FAKE_BENCH = r'''
import json, os, sys, time

args = sys.argv[1:]
fam = os.path.basename(args[0])[len("test_bench_"):-len(".py")] or "all"  # benchmarks/: all
mode = dict(x.split("=") for x in os.environ.get("FAKE_BENCH", "").split(",") if x).get(fam, "ok")
out = next(a.split("=", 1)[1] for a in args if a.startswith("--benchmark-json="))
skip = {args[i + 1] for i, a in enumerate(args) if a == "--deselect"}
done = []


def write():
    with open(out, "w") as f:
        json.dump({"machine_info": {"node": "fake"}, "commit_info": {}, "version": "5.1.0",
                   "datetime": "2026-01-01T00:00:00", "benchmarks": [
                       {"group": f"{fam} fwd", "name": c.split("::")[1], "fullname": c,
                        "stats": {"median": 0.001, "min": 0.001, "max": 0.001, "mean": 0.001},
                        "extra_info": {"op": fam, "direction": "fwd", "contender": "cpu",
                                       "device": "cpu", "device_name": "fake", "bytes_moved": None}}
                       for c in done]}, f)


try:
    for i in range(4):
        case = f"{args[0]}::test_{fam}[case{i}]"
        if case in skip:
            continue
        if (mode == "stuck" and i == 1) or (mode == "hang" and i == 2 and not skip):
            time.sleep(600)
        done.append(case)
    write()
    print(f"{len(done)} passed, {len(skip)} deselected")
    sys.exit(1 if mode == "fail" else 0)
except KeyboardInterrupt:
    write()
    print(f"{len(done)} passed, interrupted")
    sys.exit(2)
'''


def _fake_python(tmp_path):
    """A --python for gpu.sh: the benchmark pytest runs go to _FAKE_BENCH, the rest (torch
    checks, env.txt, merge_json / summarize / report) to this Python."""
    fake = tmp_path / "fake_bench.py"
    fake.write_text(_FAKE_BENCH)
    py = tmp_path / "python"
    py.write_text(f'''#!/bin/bash
if [ "$1" = -m ] && [ "$2" = pytest ] && [[ "$3" == benchmarks/* ]]; then
  exec "{sys.executable}" "{fake}" "${{@:3}}"
fi
exec "{sys.executable}" "$@"
''')
    py.chmod(0o755)
    return str(py)


def _bench_rehearsal(tmp_path, plan, fake, *args):
    out = tmp_path / "rec"
    r = _gpu_sh("--allow-cpu", "--python", _fake_python(tmp_path), "--out", str(out), *args,
                "bench", env={"GPU_SH_BENCH_PLAN": "; ".join(f"{n} {w} test_bench_{n}.py x"
                                                             for n, w in plan),
                              "FAKE_BENCH": fake, "OMP_NUM_THREADS": "1"}, timeout=120)
    stages = (out / "stages.txt").read_text()
    return r, out, stages, r.stdout + r.stderr + stages


def test_gpu_sh_bench_family_lines_without_budget(tmp_path):
    """No --budget: one stages.txt line per family, then the stage's counts; a failing family
    makes the exit status 1; no message shows a deadline (it printed 'until 00:00:00')."""
    r, out, stages, log = _bench_rehearsal(tmp_path, [("good", 1), ("bad", 1)], "bad=fail")
    assert r.returncode == 1, log
    lines = [ln for ln in stages.splitlines() if ln.startswith("bench")]
    assert len(lines) == 3, log
    assert lines[0].startswith("bench/good: ok in "), log
    assert lines[1].startswith("bench/bad: FAILED (rc 1) in "), log
    assert lines[2].startswith("bench: 1 ok, 0 cut off, 1 failed, 0 skipped in "), log
    assert "(no budget)" in stages.splitlines()[0], log
    everything = log + (out / "bench.log").read_text() + (out / "env.txt").read_text()
    assert "00:00:00" not in everything and "gpu.sh: bench/good (no budget)" in everything, log
    assert len(json.loads((out / "bench.json").read_text())["benchmarks"]) == 8
    r = _gpu_sh("--dry-run", "--python", sys.executable, "test", "bench")
    assert r.stdout.count(": no cap (no budget)") == 2 and "cap 0 s" not in r.stdout, r.stdout


def test_gpu_sh_bench_cut_off_family_completed_by_second_pass(tmp_path):
    """A family stopped at its share does not mark the stage cut off: the next family runs, the
    time it leaves goes to a second pass over the cases the first JSON lacks, and the record is
    complete: exit 0, each case once in bench.json."""
    r, out, stages, log = _bench_rehearsal(tmp_path, [("slow", 1), ("quick", 1)], "slow=hang",
                                           "--budget", "52")
    lines = [ln for ln in stages.splitlines() if ln.startswith("bench")]
    assert len(lines) == 4, log
    assert lines[0].startswith("bench/slow: CUT OFF at its share ("), log
    assert lines[1].startswith("bench/quick: ok in "), log
    assert lines[2].startswith("bench/slow, second pass (without the 2 cases recorded): ok in "), log
    assert lines[3].startswith("bench: 2 ok, 0 cut off, 0 failed, 0 skipped in "), log
    assert "CUT OFF by the budget" not in stages and r.returncode == 0, log
    names = [b["name"] for b in json.loads((out / "bench.json").read_text())["benchmarks"]]
    assert sorted(names) == sorted([f"test_slow[case{i}]" for i in range(4)]
                                   + [f"test_quick[case{i}]" for i in range(4)]), names
    assert (out / "bench-slow.rest.json").is_file() and (out / "SUMMARY.md").is_file()


def test_gpu_sh_bench_family_left_cut_off_is_a_partial_record(tmp_path):
    """A family still cut off at the end, and one left no time: exit 3 (a partial record, not a
    failure), their lines in stages.txt, what the cut-off family ran merged into bench.json."""
    # weight 0: the stuck family's share is the whole stage, the last one is left nothing
    r, out, stages, log = _bench_rehearsal(tmp_path, [("stuck", 1), ("late", 0)], "stuck=stuck",
                                           "--budget", "46")
    assert r.returncode == 3, log
    lines = [ln for ln in stages.splitlines() if ln.startswith("bench")]
    assert len(lines) == 3, log
    assert lines[0].startswith("bench/stuck: CUT OFF at its share ("), log
    assert lines[1] == "bench/late: skipped (no time left)", log
    assert lines[2].startswith("bench: 0 ok, 1 cut off, 0 failed, 1 skipped in "), log
    assert "gpu.sh: results in" in r.stdout and "(exit 3)" in r.stdout, log
    assert [b["name"] for b in json.loads((out / "bench.json").read_text())["benchmarks"]] == [
        "test_stuck[case0]"]


def test_interrupted_run_still_writes_the_json_of_the_finished_cases(tmp_path):
    """A run stopped inside a case's timing (gpu.sh's budget sends SIGINT) leaves that case with
    no round or only some; the suite's conftest drops it so pytest-benchmark still writes the JSON
    of every case that finished (it used to fail on ``min()`` of an empty case and write nothing,
    and kept a half-measured one)."""
    (tmp_path / "test_cut.py").write_text(
        "import time\n"
        "def test_done(benchmark):\n"
        "    benchmark(time.sleep, 0.0001)\n"
        "def test_cut(benchmark):\n"
        "    def f():\n"
        "        raise KeyboardInterrupt\n"
        "    benchmark.pedantic(f, rounds=5, iterations=1)\n")
    (tmp_path / "test_half.py").write_text(
        "import time\n"
        "def test_done(benchmark):\n"
        "    benchmark.pedantic(time.sleep, args=(0.0001,), rounds=3, iterations=1)\n"
        "calls = [0]\n"
        "def test_half(benchmark):\n"
        "    def f():\n"
        "        calls[0] += 1\n"
        "        if calls[0] > 2:\n"
        "            raise KeyboardInterrupt\n"
        "    benchmark.pedantic(f, rounds=5, iterations=1)\n")
    out = tmp_path / "out.json"
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "benchmarks"), env["PYTHONPATH"]])

    def run(test_file):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", test_file, "-q",
                               "-p", "no:cacheprovider", "--system-malloc",
                               f"--benchmark-json={out}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    r = run("test_cut.py")
    assert "KeyboardInterrupt" in r.stdout + r.stderr, r.stdout + r.stderr
    assert out.exists(), r.stdout + r.stderr
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_done"]
    # stopped after 2 of 5 rounds: left out too (gpu.sh's second pass re-runs what is missing)
    r = run("test_half.py")
    got = json.loads(out.read_text())["benchmarks"]
    assert [(b["name"], b["stats"]["rounds"]) for b in got] == [("test_done", 3)], r.stdout


@pytest.mark.skipif(vk.backends.why_unavailable("triton", "cpu") is not None,
                    reason="no Triton (interpreter) here")
def test_tile_variants_compute_what_the_defaults_do(tmp_path):
    """benchmarks/test_bench_tiles.py under the Triton interpreter (--quick, CPU): every tile
    variant a GPU run will time (MoE grouped GEMM / weight gradient, RoPE-3D attention forward /
    backward at head_dim 64 and 128, temporal attention launch knobs) runs with its tiles and gives the default's result on the
    same inputs (the tiles each variant's launches took are recorded and checked), and the
    summary counts the variants as ours (no "best peer" among them)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import test_bench_tiles as T
        import summarize
    finally:
        sys.path.pop(0)
    from vidgen_kernels.triton_kernels import moe as TM
    out = tmp_path / "tiles.json"
    # with the interpreter fixes this test suite runs under (tests/interp_fixes.py; before Triton
    # 3.7 a loop bound passed as a kernel argument fails there under numpy 2.4), installed in
    # the subprocess before pytest imports the benchmarks
    args = ["benchmarks/test_bench_tiles.py", "-q", "-p", "no:cacheprovider", "--quick",
            "--bench-device", "cpu", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
            f"--benchmark-json={out}"]
    boot = ("import sys, interp_fixes, pytest; interp_fixes.install(); "
            f"sys.exit(pytest.main({args!r}))")
    env = _env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join((os.path.join(ROOT, "tests"), env["PYTHONPATH"]))
    r = subprocess.run([sys.executable, "-c", boot], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    benches = json.loads(out.read_text())["benchmarks"]
    variants = [b for b in benches if b["extra_info"]["contender"].startswith("tiles ")
                and b["extra_info"]["contender"] != T.DEFAULT]
    n_variants = sum(len(v) for table in (T.MOE_VARIANTS, T.ROPE3D_VARIANTS, T.TEMPORAL_VARIANTS)
                     for v in table.values())
    assert len(variants) == n_variants, [b["name"] for b in benches]
    assert all(b["extra_info"]["max_rel_err_vs_default"] <= 5e-3 for b in variants)
    for b in variants:  # each variant's launches took its tiles
        ei = b["extra_info"]
        got, name = ei["launched_tiles"], ei["contender"][len("tiles "):]
        if ei["kernel"].startswith("temporal"):
            assert got["knobs"] == T.TEMPORAL_VARIANTS[ei["kernel"][-3:]][name], (b["name"], got)
        elif ei["kernel"].startswith("rope3d"):
            v = T.ROPE3D_VARIANTS[(ei["kernel"][-3:], ei["shape"][4])][name]
            for kern in ("fwd", "dkdv", "dq"):
                if kern in v:
                    assert got[kern] == list(v[kern]), (b["name"], got)
            assert got["stages"] == v.get("stages"), (b["name"], got)
        else:
            kern = ei["kernel"][len("moe_"):]
            v = T.MOE_VARIANTS[kern][name]
            want = v.get(kern) or (TM._TILES_SMALL[kern] if v.get("small") else None)
            if want is not None:
                assert got[kern][:5] == list(want), (b["name"], got)
            if kern == "gmm":
                assert got["gmm"][5] == (0 if v.get("small") else v.get("group_m", TM._GROUP_M))
    assert {b["extra_info"]["kernel"] for b in benches} == {
        "moe_gmm", "moe_wgrad", "rope3d_attn_fwd", "rope3d_attn_bwd", "temporal_attn_fwd",
        "temporal_attn_bwd"}
    assert summarize.is_ours("tiles default") and summarize.is_ours("tiles stages 2")
    assert not summarize.is_ours("dense") and not summarize.is_ours("sdpa")
