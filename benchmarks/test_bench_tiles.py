"""Tile variants of the Triton kernels, side by side, so one GPU run can set their tiles.

Run::

    python -m pytest benchmarks/test_bench_tiles.py --bench-device cuda --benchmark-json /tmp/t.json
    python benchmarks/summarize.py /tmp/t.json

The Triton launchers' tiles were chosen without a GPU, from compiler reports (spills, shared
memory, and which tensor-core instructions the dots became: ``aot_check``). This family times each
launcher's own choice (contender ``tiles default``) against alternatives (``tiles <variant>``) on
the shapes the issues name; every variant is first checked against the default's result (same
inputs; bf16 tolerance). Groups, bf16 on CUDA:

* ``rope3d_attn_fwd`` / ``rope3d_attn_bwd`` (the kernel launchers, RoPE on, no mask) at
  CogVideoX-5B (``B=1, H=48, D=64``, 226 text + 13x30x45 video tokens) and Wan-1.3B (``H=12,
  D=128``, 21x30x52 tokens). The backward is timed alone (from a saved forward). Its default at
  D = 128 takes 32 keys per dk/dv program, so Hopper runs that kernel's dv / dk dots as the
  warp-level ``mma.sync`` (32 rows are too few for a warpgroup MMA); ``dkdv 64x64`` makes every dot
  a ``wgmma`` at 256-336 B of spills (sm_90a builds, triton 3.9 / 3.6); ``stages 2`` pipelines
  the backward's loads (the default is one stage). ``--quick``: the Wan-1.3B shape only.
* ``moe_gmm`` / ``moe_wgrad``: the MoE grouped GEMMs (the first expert GEMM with its bias + gelu
  epilogue; the weight gradient) at E=8, C=1152, F=4608 and 16,384 tokens top-2 (32,768 rows,
  balanced), through ``gemm_tiles``; ``tiles small`` is the first version's 64 x 64 x 32 (and
  32-row weight-gradient tiles, launched column block after column block); ``group_m 0`` /
  ``group_m 32``: the default tiles launched in that order / in groups of 32 row tiles (the
  default groups 8, for L2 reuse of the rows); ``dense`` is one ``torch.mm`` of the same FLOPs (issue 5's GPU
  target: the grouped GEMM at >= 70 % of its TFLOP/s).

The variants are Hopper (sm_90) candidates: built for the mma.sync GPUs (sm_80 - sm_89, sm_120)
several spill kilobytes (those GPUs have their own tables), so there they are skipped and only
the defaults and ``dense`` run; ``benchmarks/results/triton-aot-2026-12-07-mma`` lists every
variant's registers, spills and MMA instructions. Each case records the tiles its launches
actually took (``extra_info["launched_tiles"]``).

* ``temporal_attn_fwd`` / ``temporal_attn_bwd``: the causal temporal attention's resident
  kernels at issue 4's shapes ``(B, T, S, H, D)`` = (2, 16, 32x32, 16, 64) and (1, 32, 16x16, 8,
  64), read in place from ``[B, T, S, H, D]`` (memory-bound: many short sequences), through the
  launchers' knobs: sequences per program (default about 128 frame rows: 8 at T = 16, 4 at
  T = 32), warps, pipeline stages.

Work model (``extra_info``): ``flops`` = 4 B H S^2 D for the attention forward, 2.5x that for its
backward; 2 P C F for each GEMM; temporal attention: its causal forward 2 B S H T^2 D (half the
T x T pairs), 2.5x for the backward, and ``bytes_moved`` (forward: q, k, v, out; backward: q,
k, v, out, dout, dq, dk, dv; the small lse aside) for the bandwidth it reaches. Variants are tile
tuples and launch knobs, not new kernels: what wins here becomes the launcher's default
(``_tiles`` in ``triton_kernels/rope3d_attention.py``, ``_TILES_16BIT`` / ``_GROUP_M`` in
``triton_kernels/moe.py``, ``_ROWS_PER_PROGRAM`` and the warps rule in
``triton_kernels/temporal_attention.py``).

On CPU the family has cases only in ``--quick`` mode under the Triton interpreter
(``TRITON_INTERPRET=1``): tiny fp16 shapes, every variant checked against the default (a test of
the variants, not a timing; ``tests/test_bench_cli.py`` runs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import pytest
import torch

import common

OP = "triton_tiles"
DEFAULT = "tiles default"
DENSE = "dense"
# RoPE-3D attention variants by direction and head dim: per-kernel (BLOCK_M, BLOCK_N, warps) for
# "fwd" / "dkdv" / "dq" (unnamed kernels keep the launcher's tiles) and "stages" (num_stages)
ROPE3D_VARIANTS = {
    ("fwd", 64): {"128x64 w8": {"fwd": (128, 64, 8)}, "128x128 w8": {"fwd": (128, 128, 8)},
                  "stages 3": {"stages": 3}},
    ("fwd", 128): {"128x128 w8": {"fwd": (128, 128, 8)}, "64x64 w4": {"fwd": (64, 64, 4)},
                   "stages 3": {"stages": 3}},
    ("bwd", 64): {"stages 2": {"stages": 2}, "dkdv 64x128 w8": {"dkdv": (64, 128, 8)},
                  "dq 128x64 w8": {"dq": (128, 64, 8)}},
    ("bwd", 128): {"dkdv 64x64": {"dkdv": (64, 64, 8)},
                   "dkdv+dq 64x64": {"dkdv": (64, 64, 8), "dq": (64, 64, 8)},
                   "stages 2": {"stages": 2}},
}
# MoE grouped GEMM variants: gemm_tiles() arguments
MOE_VARIANTS = {
    "gmm": {"128x256x64 w8 s3": dict(gmm=(128, 256, 64, 8, 3)),
            "128x128x64 w4 s4": dict(gmm=(128, 128, 64, 4, 4)),
            "128x128x32 w8 s4": dict(gmm=(128, 128, 32, 8, 4)),
            "group_m 0": dict(group_m=0), "group_m 32": dict(group_m=32),
            "small": dict(small=True)},
    "wgrad": {"128x256x64 w8 s3": dict(wgrad=(128, 256, 64, 8, 3)),
              "64x128x64 w4 s3": dict(wgrad=(64, 128, 64, 4, 3)),
              "128x128x32 w8 s4": dict(wgrad=(128, 128, 32, 8, 4)),
              "small": dict(small=True)},
}
# temporal attention variants: the launchers' keyword knobs
TEMPORAL_VARIANTS = {
    "fwd": {"spp 2": dict(seqs_per_program=2), "spp 32": dict(seqs_per_program=32),
            "warps 8": dict(num_warps=8), "stages 3": dict(num_stages=3)},
    "bwd": {"spp 2": dict(seqs_per_program=2), "spp 16": dict(seqs_per_program=16),
            "warps 8": dict(num_warps=8), "stages 3": dict(num_stages=3)},
}
# (B, T, (Sh, Sw), H, D)
TEMPORAL_SHAPES = {"cuda": ((2, 16, (32, 32), 16, 64), (1, 32, (16, 16), 8, 64)),
                   "cpu": ((1, 16, (2, 3), 2, 64),)}
# (B, text, (F, Hh, Ww), H, D, label)
ROPE3D_SHAPES = {"cuda": ((1, 226, (13, 30, 45), 48, 64, "cogvideox-5b"),
                          (1, 0, (21, 30, 52), 12, 128, "wan-1.3b")),
                 "cpu": ((1, 4, (2, 4, 4), 2, 64, "tiny-d64"), (1, 0, (2, 4, 4), 2, 128, "tiny-d128"))}
# (E, C, F, N tokens); top-2, balanced
MOE_SHAPES = {"cuda": ((8, 1152, 4608, 16384),), "cpu": ((3, 48, 80, 45),)}  # widths: multiples of 16, as real ones
TOP_K = 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Case:
    kernel: str  # rope3d_attn_fwd, rope3d_attn_bwd, moe_gmm, moe_wgrad
    shape: tuple
    device: str
    dtype: torch.dtype
    contender: str  # DEFAULT, "tiles <variant>" or DENSE

    @property
    def label(self) -> str:
        if self.kernel.startswith("rope3d"):
            return self.shape[-1]
        if self.kernel.startswith("temporal"):
            B, T, (Sh, Sw), H, D = self.shape
            return f"B{B}xT{T}xS{Sh}x{Sw}xH{H}xD{D}"
        return "E{}xC{}xF{}xN{}".format(*self.shape)

    @property
    def id(self) -> str:
        return (f"{OP}-{self.kernel}-{self.label}-{common.dtype_name(self.dtype)}-{self.device}-"
                f"{self.contender.replace(' ', '_')}")

    @property
    def group(self) -> str:
        return f"{OP} {self.kernel} {self.label} {common.dtype_name(self.dtype)} {self.device}"

    @property
    def variant(self) -> dict | None:
        """The tile settings of a ``tiles <variant>`` contender (None: default / dense)."""
        if not self.contender.startswith("tiles ") or self.contender == DEFAULT:
            return None
        name = self.contender[len("tiles "):]
        if self.kernel.startswith("rope3d"):
            return ROPE3D_VARIANTS[(self.kernel[-3:], self.shape[4])][name]
        if self.kernel.startswith("temporal"):
            return TEMPORAL_VARIANTS[self.kernel[-3:]][name]
        return MOE_VARIANTS[self.kernel[4:]][name]


def make_cases(quick: bool, devices) -> list[Case]:
    """The cases, most wanted first (a run the budget cuts off keeps those): the MoE GEMMs (their
    tiles changed without a timing), the temporal attention (issue 4's GPU targets), the RoPE-3D
    backward at D = 128 (mma.sync on Hopper), then the rest."""
    cases = []
    for dev in devices:
        if dev == "cpu" and not (quick and _interpreting()):
            continue  # the CPU has no Triton GPU code to tune; the interpreter checks variants
        dtype = torch.bfloat16 if dev == "cuda" else torch.float16
        for shape in MOE_SHAPES[dev]:
            for kern in ("gmm", "wgrad"):
                cases += [Case(f"moe_{kern}", shape, dev, dtype, c)
                          for c in (DEFAULT, *(f"tiles {n}" for n in MOE_VARIANTS[kern]), DENSE)]
        for shape in TEMPORAL_SHAPES[dev][:1] if quick else TEMPORAL_SHAPES[dev]:
            for direction in ("fwd", "bwd"):
                cases += [Case(f"temporal_attn_{direction}", shape, dev, dtype, c)
                          for c in (DEFAULT, *(f"tiles {n}" for n in TEMPORAL_VARIANTS[direction]))]
        shapes = ROPE3D_SHAPES[dev][-1:] if quick and dev == "cuda" else ROPE3D_SHAPES[dev]
        for direction, D in (("bwd", 128), ("bwd", 64), ("fwd", 64), ("fwd", 128)):
            for shape in (s for s in shapes if s[4] == D):
                cases += [Case(f"rope3d_attn_{direction}", shape, dev, dtype, c)
                          for c in (DEFAULT, *(f"tiles {n}" for n in ROPE3D_VARIANTS[(direction, D)]))]
    return cases


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def flops(case: Case) -> int:
    if case.kernel.startswith("temporal"):
        B, T, (Sh, Sw), H, D = case.shape
        # causal: the T (T + 1) / 2 (query, key) pairs a frame sees (the diagonal included), as
        # test_bench_temporal_attention counts them
        f = 4 * B * Sh * Sw * H * (T * (T + 1) // 2) * D
        return int(2.5 * f) if case.kernel.endswith("bwd") else f
    if case.kernel.startswith("rope3d"):
        B, text, (F_, Hh, Ww), H, D, _ = case.shape
        S = text + F_ * Hh * Ww
        f = 4 * B * H * S * S * D
        return int(2.5 * f) if case.kernel.endswith("bwd") else f
    E, C, F_, N = case.shape
    return 2 * N * TOP_K * C * F_


# ----------------------------------------------------------------------------------------------
# inputs and calls
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case) -> dict:
    g = torch.Generator(device=case.device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=case.device)  # noqa: E731
    if case.kernel.startswith("temporal"):
        from vidgen_kernels.triton_kernels import temporal_attention as tk
        B, T, (Sh, Sw), H, D = case.shape
        S = Sh * Sw
        q, k, v = (rnd(B, T, S, H, D).to(case.dtype) for _ in range(3))
        inp = dict(q=q, k=k, v=v, scale=D ** -0.5)
        if case.kernel.endswith("bwd"):
            out = torch.empty_like(q)
            lse = torch.empty((B, S, H, T), dtype=torch.float32, device=case.device)
            tk.temporal_attn_fwd(q, k, v, None, None, out, lse, True, True, 0, inp["scale"])
            inp.update(out=out, lse=lse, dout=rnd(B, T, S, H, D).to(case.dtype))
        return inp
    if case.kernel.startswith("rope3d"):
        import vidgen_kernels as vk
        B, text, grid, H, D, _ = case.shape
        S = text + math.prod(grid)
        # the [B, S, H, D] slices of one fused qkv projection, read in place by the kernels
        q, k, v = rnd(B, S, 3, H, D).to(case.dtype).unbind(2)
        cos, sin = vk.rope3d_freqs(*grid, D, device=case.device)
        inp = dict(q=q, k=k, v=v, cos=cos, sin=sin, text=text, scale=D ** -0.5)
        if case.kernel.endswith("bwd"):
            from vidgen_kernels.triton_kernels import rope3d_attention as rk
            inp["out"], inp["lse"] = rk.rope3d_attn_fwd(q, k, v, cos, sin, text, True, 0, 0, 0,
                                                        inp["scale"])
            inp["dout"] = rnd(B, S, H, D).to(case.dtype)
        return inp
    E, C, F_, N = case.shape
    P = N * TOP_K
    ends = [(e + 1) * P // E for e in range(E)]  # balanced experts
    inp = dict(a=(rnd(P, C) * 0.5).to(case.dtype),
               offs=torch.tensor(ends, dtype=torch.int64, device=case.device))
    if case.kernel == "moe_gmm":
        inp.update(w=(rnd(E, C, F_) * C ** -0.5).to(case.dtype), b=(rnd(E, F_) * 0.1).to(case.dtype))
    else:
        inp["dy"] = rnd(P, F_).to(case.dtype)
    return inp


LAUNCHED: dict = {}  # kernel -> the tiles its last launch took (see _tiles_of)


@contextlib.contextmanager
def _tiles_of(case: Case):
    """Within the context, the case's variant tiles are the launchers' tiles (none: the
    launchers' own); the tiles each launch takes are recorded in ``LAUNCHED``."""
    variant = case.variant or {}
    if case.kernel.startswith("moe"):
        from vidgen_kernels.triton_kernels import moe as TM
        orig_moe = TM._tiles

        def moe_tiles(kernel, *args, **kwargs):
            t = orig_moe(kernel, *args, **kwargs)
            LAUNCHED[kernel] = (*t, TM._group_m()) if kernel == "gmm" else t
            return t
        TM._tiles = moe_tiles
        try:
            with TM.gemm_tiles(**variant) if variant else contextlib.nullcontext():
                yield
        finally:
            TM._tiles = orig_moe
        return
    from vidgen_kernels.triton_kernels import rope3d_attention as rk
    orig = rk._tiles

    def tiles(kernel, q, rope, block_m=None, block_n=None, num_warps=None):
        t = variant.get(kernel) or orig(kernel, q, rope, block_m, block_n, num_warps)
        LAUNCHED[kernel] = t
        return t
    rk._tiles = tiles
    try:
        yield
    finally:
        rk._tiles = orig


def step_fn(case: Case, inp: dict):
    """The timed call (with the case's tiles in force for each call)."""
    if case.kernel.startswith("temporal"):
        from vidgen_kernels.triton_kernels import temporal_attention as tk
        knobs = dict(case.variant or {})
        LAUNCHED["knobs"] = knobs  # the launcher's keyword knobs ({}: its own choice)
        q, k, v, scale = inp["q"], inp["k"], inp["v"], inp["scale"]
        B, T, (Sh, Sw), H, D = case.shape
        if case.kernel.endswith("fwd"):
            def run():
                out = torch.empty_like(q)
                lse = torch.empty((B, Sh * Sw, H, T), dtype=torch.float32, device=q.device)
                tk.temporal_attn_fwd(q, k, v, None, None, out, lse, True, True, 0, scale,
                                     tiled=False, **knobs)
                return out
            return run

        def run():
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            tk.temporal_attn_bwd(inp["dout"], q, k, v, None, None, inp["out"], inp["lse"], dq,
                                 dk, dv, True, True, 0, scale, tiled=False, **knobs)
            return dq, dk, dv
        return run
    if case.kernel.startswith("rope3d"):
        from vidgen_kernels.triton_kernels import rope3d_attention as rk
        stages = (case.variant or {}).get("stages")
        q, k, v, cos, sin, text, scale = (inp[n] for n in ("q", "k", "v", "cos", "sin", "text", "scale"))
        LAUNCHED["stages"] = stages  # None: the launcher's (2 forward, 1 backward)
        if case.kernel.endswith("fwd"):
            def run():
                with _tiles_of(case):
                    return rk.rope3d_attn_fwd(q, k, v, cos, sin, text, True, 0, 0, 0, scale,
                                              num_stages=stages)[0]
            return run

        def run():
            with _tiles_of(case):
                return rk.rope3d_attn_bwd(inp["dout"], q, k, v, cos, sin, inp["out"], inp["lse"],
                                          text, True, 0, 0, 0, scale, num_stages=stages)
        return run
    from vidgen_kernels.triton_kernels import moe as TM
    a, offs = inp["a"], inp["offs"]
    if case.contender == DENSE:  # one GEMM of the same FLOPs: [P, C] @ [C, F] (or a^T dy)
        if case.kernel == "moe_gmm":
            w0 = inp["w"][0]
            return lambda: a @ w0
        return lambda: a.t() @ inp["dy"]
    if case.kernel == "moe_gmm":
        def run():
            with _tiles_of(case):
                return TM.gmm_act(a, inp["w"], offs, inp["b"], "gelu")[1]
        return run

    def run():
        with _tiles_of(case):
            return TM.gmm_wgrad(a, inp["dy"], offs, offs.shape[0])
    return run


def _as_list(r) -> list:
    return list(r) if isinstance(r, (tuple, list)) else [r]


_DEFAULT_RESULTS: dict = {}  # the group's default result (one group kept)


def check_against_default(case: Case, run, inp: dict) -> float:
    """Max relative error of the variant's result vs the launcher default's on the same inputs."""
    if case.group not in _DEFAULT_RESULTS:
        _DEFAULT_RESULTS.clear()
        dc = dataclasses.replace(case, contender=DEFAULT)
        _DEFAULT_RESULTS[case.group] = [t.detach().clone() for t in _as_list(step_fn(dc, inp)())]
    return common.assert_rel_err(case, _as_list(run()), _DEFAULT_RESULTS[case.group],
                                 "the default tiles")


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender == DENSE:
        return None
    from vidgen_kernels.backends import why_unavailable
    why = why_unavailable("triton", case.device)
    if why is None and case.variant is not None and case.device == "cuda":
        from vidgen_kernels.triton_kernels._launch import mma_sync_arch, target_arch
        arch = target_arch(torch.empty(0, device="cuda"))
        if mma_sync_arch(arch):
            why = (f"a Hopper (sm_90) tile candidate; this GPU is sm_{arch}, an mma.sync GPU, "
                   f"where such tiles spill (its launchers have their own tables)")
    return why


def test_tiles(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")
    quick = request.config.getoption("--quick")
    inp = make_inputs(case)
    LAUNCHED.clear()
    run = step_fn(case, inp)
    info = {}
    if case.contender.startswith("tiles "):
        info["max_rel_err_vs_default"] = check_against_default(case, run, inp)
    common.measure(benchmark, request, run, case.device, common.heavy_policy(quick, case.device),
                   case.id, info)
    info["launched_tiles"] = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in sorted(LAUNCHED.items())}
    fl = flops(case)
    info["gflops"], info["gflops_cuda_events"] = common.per_second(fl, info)
    info.update(
        op=OP, kernel=case.kernel, direction="bwd" if case.kernel.endswith("bwd") else "fwd",
        contender=case.contender,
        backend="triton" if case.contender != DENSE else None, variant=case.variant,
        dtype=common.dtype_name(case.dtype), shape=list(case.shape), device=case.device,
        device_name=common.device_name(case.device), flops=fl,
        matmul_peak_flops=common.matmul_peak_flops(case.device, case.dtype),
        flops_counted=("4*B*S*H*D * T(T+1)/2 (causal)" if case.kernel.startswith("temporal") else
                       "4*B*H*S^2*D" if case.kernel.startswith("rope3d") else "2*N*k*C*F")
        + (" * 2.5 (backward)" if case.kernel.endswith("bwd") else ""),
    )
    if case.kernel.startswith("temporal"):  # memory-bound: the bytes it must move at least
        B, T, (Sh, Sw), H, D = case.shape
        # forward: read q, k, v, write out; backward: read q, k, v, out, dout, write dq, dk, dv
        tensors = 8 if case.kernel.endswith("bwd") else 4
        info["bytes_moved"] = tensors * B * T * Sh * Sw * H * D * case.dtype.itemsize
        info["gbps"], info["gbps_cuda_events"] = common.per_second(info["bytes_moved"], info)
    benchmark.extra_info.update(info)
    del run, inp
    common.release(case.device, False)
