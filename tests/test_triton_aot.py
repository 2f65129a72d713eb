"""vidgen_kernels.triton_kernels.aot_check: the Triton kernels compile ahead of time for a GPU
target on a machine without one (the full check is `make check-triton`, run by CI); here one
family, and the guards."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, interpret=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "vidgen_kernels.triton_kernels.aot_check", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_rope_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "aot.json"
    r = _run("--only", "rope", "--quick", "--arch", "90", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["failures"]
    ks = data["kernels"]
    # forward and backward (CONJ) x interleaved / half x D = 64 / 128, bf16 and fp32
    assert {k["kernel"] for k in ks} == {"_rope_kernel"} and len(ks) >= 8, ks
    assert all(k["arch"] == 90 and k["regs"] and k["shared"] <= 232448 for k in ks), ks
    assert any("CONJ=True" in k["config"] for k in ks) and any("*bf16" in k["config"] for k in ks)
    assert "sm90  _rope_kernel" in r.stdout
    # bit-exact contract (each product and the difference rounded apart, as eager PyTorch): no
    # fused multiply-add in the PTX (the interpreter never fuses: only this check can see it)
    assert all(k["fma_f32"] == 0 for k in ks), [(k["config"], k["fma_f32"]) for k in ks]
    # memory-bound: a unit-stride row of 16 heads moves in 16-byte vectors only, interleaved
    # pairs too (two stride-2 loads of the pairs' halves compiled to 2- and 4-byte accesses)
    wide = [(k["config"], k["access_bytes"]) for k in ks if "*bf16" in k["config"]]
    assert {"INTERLEAVED=True" in c for c, _ in wide} == {True, False}, wide
    assert all(w == [16] for _, w in wide), wide


def test_refuses_under_the_interpreter_and_unknown_families():
    r = _run("--only", "rope", interpret=True)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr
    r = _run("--only", "attention")
    assert r.returncode == 2 and "unknown families" in r.stderr


def test_temporal_attention_falls_back_to_fewer_stages_when_shared_memory_runs_out(tmp_path):
    """The temporal launcher retries with fewer pipeline stages on OutOfResources. With a
    7000-byte limit the pipelined (2-stage) builds of this config do not fit and the 1-stage
    ones do: the check passes, and both builds are listed, the first marked over the limit."""
    out = tmp_path / "aot.json"
    r = _run("--quick", "--arch", "90", "--only", "temporal_attention",
             "--case", "D=64 T=16 S=1024.*bfloat16", "--shared-limit", "7000", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ks = json.loads(out.read_text())["kernels"]
    for name in ("_temporal_attn_fwd_kernel", "_temporal_attn_bwd_kernel"):
        builds = {("num_stages=2" in k["config"], k["over_shared"]) for k in ks if k["kernel"] == name}
        assert builds == {(True, True), (False, False)}, (name, ks)
        # the FMA count the bit-exact check reads is live: attention kernels do fuse
        assert all(k["fma_f32"] > 0 for k in ks if k["kernel"] == name), (name, ks)
    r = _run("--quick", "--arch", "90", "--only", "temporal_attention",
             "--case", "D=64 T=16 S=1024.*bfloat16", "--shared-limit", "6000")
    # 1 stage does not fit either: the launcher's ValueError says what it needs
    assert r.returncode == 1 and "B of shared memory per block, this GPU allows 6000 B" in r.stderr, r.stderr


def test_rope3d_attention_ampere_tiles_and_shared_memory_fallback(tmp_path):
    """bf16 RoPE-3D attention for sm_80 / sm_86 / sm_120 (the mma.sync GPUs) with the Ampere tile
    table of the launcher: the frame-causal D = 64 builds spill at most a few hundred bytes (the
    sm_90 tiles spilled 3.5-4.3 KB on sm_80, 1.2 KB on sm_120). On sm_86 and sm_120 (99 KiB of
    shared memory per block) the D = 256 forward's 2-stage build is over the limit and the
    launcher falls back to one stage: the check passes."""
    out = tmp_path / "aot.json"
    r = _run("--arch", "80", "86", "120", "--only", "rope3d_attention",
             "--case", "D=(64 frame_causal|256 interleaved) bfloat16", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ks = json.loads(out.read_text())["kernels"]
    d64 = [k for k in ks if "BLOCK_D=64," in k["config"] and "ROPE=True" in k["config"]]
    assert {k["kernel"] for k in d64} >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    assert all(k["stack_bytes"] is not None and k["stack_bytes"] <= 512 for k in d64), d64
    assert {k["arch"] for k in d64} == {80, 86, 120}
    for arch in (86, 120):
        fwd256 = {("num_stages=2" in k["config"], k["over_shared"]) for k in ks
                  if k["arch"] == arch and k["kernel"] == "_fwd_kernel" and "BLOCK_D=256," in k["config"]}
        assert fwd256 == {(True, True), (False, False)}, (arch, fwd256)


def test_rope3d_attention_jvp_float32_builds():
    """The forward-mode (JVP) kernel in float32 at D = 256 for sm_90 (H100) and sm_120 (RTX 5090):
    with a 16 x 16 tile (the sm_90 JVP tiles, BLOCK_M halved for float32) triton 3.9's LLVM
    aborted the process (an SLPVectorizer assertion); float32 now takes BLOCK_N >= 32 and the
    mma.sync GPUs the sm_80 JVP tiles, and both build."""
    r = _run("--arch", "90", "120", "--only", "rope3d_attention", "--case", "D=256 jvp float32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 failed" in r.stdout, r.stdout[-3000:]


def test_moe_grouped_gemms_use_warpgroup_mma_on_hopper(tmp_path):
    """bf16 MoE grouped GEMMs built for sm_90 (H100 / H200): every dot is a warpgroup MMA
    (``wgmma``), none the warp-level ``mma.sync`` Hopper falls back to for small tiles (the
    weight gradient's first 32-row tiles did), for few rows per expert (64-row tiles) and many
    (128-row); sm_80 builds use ``mma.sync`` (no wgmma there). No build spills registers."""
    out = tmp_path / "aot.json"
    r = _run("--quick", "--arch", "90", "80", "--only", "moe", "--case", "bfloat16", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"; 0 sm_90 builds with mma\.sync dots", r.stdout), r.stdout[-3000:]
    ks = [k for k in json.loads(out.read_text())["kernels"] if "*bf16" in k["config"]]
    for arch in (90, 80):
        mine = [k for k in ks if k["arch"] == arch]
        assert {k["kernel"] for k in mine} == {"_gmm_kernel", "_wgrad_kernel"}, mine
        if arch == 90:
            assert all(k["wgmma"] > 0 and k["mma_sync"] == 0 for k in mine), mine
        else:
            assert all(k["mma_sync"] > 0 and k["wgmma"] == 0 for k in mine), mine
        rows = {c.split("=")[1] for k in mine if k["kernel"] == "_gmm_kernel"
                for c in k["config"].split(", ") if c.startswith("BLOCK_M=")}
        assert rows == {"64", "128"}, (arch, rows)
        assert all(k["stack_bytes"] == 0 for k in mine), mine


def test_stage_fallback_is_remembered_per_dtype(monkeypatch):
    """launch() remembers a fewer-stages fallback per kernel, config, device and now the tensor
    dtypes: an fp32 build over the shared-memory limit no longer demotes the 16-bit build of
    the same config (which fits) to one stage for the rest of the process."""
    import torch
    from triton.runtime.errors import OutOfResources
    from vidgen_kernels.triton_kernels import _launch
    monkeypatch.setattr(_launch, "_STAGES_FALLBACK", {})
    calls = []

    class Kernel:  # fp32 needs one stage to fit, fp16 fits with two
        __name__ = "_fake_kernel"

        def __getitem__(self, grid):
            def run(x, **meta):
                calls.append((x.dtype, meta["num_stages"]))
                if x.dtype == torch.float32 and meta["num_stages"] > 1:
                    raise OutOfResources(200000, 100000, "shared memory")
            return run
    k = Kernel()
    meta = dict(BLOCK=16, num_warps=4, num_stages=2)
    _launch.launch(k, (1,), (torch.zeros(1),), meta, "cuda:0")
    _launch.launch(k, (1,), (torch.zeros(1, dtype=torch.float16),), meta, "cuda:0")
    _launch.launch(k, (1,), (torch.zeros(1),), meta, "cuda:0")
    assert calls == [(torch.float32, 2), (torch.float32, 1), (torch.float16, 2), (torch.float32, 1)]
