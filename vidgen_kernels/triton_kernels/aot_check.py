"""Ahead-of-time compile check of every Triton kernel for a GPU target, on a machine without one.

    python -m vidgen_kernels.triton_kernels.aot_check [--arch 90 80] [--quick] [--json FILE]
                     [--only adaln,rope,...] [--case REGEX] [--shared-limit BYTES]

The Triton interpreter (how the tests run the kernels on a CPU) accepts programs the GPU compiler
rejects and knows nothing of registers or shared memory. This check drives the public ops with
``backend="triton"`` on CPU tensors through their real launchers, forward and backward, over the
dtypes and the head dims / widths / flags that select different kernel configurations, and
compiles each launched kernel for ``sm_<arch>`` instead of running it: Triton's own compiler
(TTIR -> TTGIR -> LLVM -> PTX -> ``ptxas``, all shipped with the ``triton`` wheel) under a stand-in
driver that reports the target. Launches are skipped, so outputs are garbage; only compilation
is checked. For each distinct kernel it reports registers, spill (stack frame) bytes, shared
memory and the tensor-core instructions its dots became (``wgmma.mma_async`` / ``mma.sync``
counts in the PTX: on sm_90 a 16-bit dot whose tile is too small for a warpgroup falls back to
the warp-level ``mma.sync``, a slower path; the summary counts such builds) and, in the JSON,
the widths of its plain global loads / stores (``access_bytes``: 16 = full 16-byte vectors, what
memory-bound kernels want); a kernel whose
shared memory exceeds the target's per-block limit raises Triton's ``OutOfResources`` as a real
launch would (launchers with a fallback, such as the temporal attention's fewer pipeline
stages, then take it and are checked with it).

Kernels whose contract is bit-exact with eager PyTorch (``BIT_EXACT``: the RoPE rotation, the
AdaLN forward's gated residual; launched with ``enable_fp_fusion=False``) must compile without a
fused fp32 multiply-add: a ``fma.rn.f32`` in their PTX is a failure (the interpreter cannot show
this: it never fuses).

Exit status: 0 when every case compiled within the limits, 1 otherwise (each failure printed).
Must run in a process where ``TRITON_INTERPRET`` is unset (it refuses otherwise). Spills are
reported, not failed: some D = 256 configurations are known to spill (see the kernels' notes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable

# per-block shared memory limits (opt-in maximum) by compute capability
SHARED_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
FAMILIES = ("adaln", "rope", "rope3d_attention", "temporal_attention", "moe")
# kernels that round every fp32 product and sum apart, as eager PyTorch does: no FMA in their PTX
BIT_EXACT = ("_rope_kernel", "_adaln_fwd_kernel")
_FMA_F32 = re.compile(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.f32(?:x2)?\b")  # x2: sm_100 packed
# tensor-core instructions in the PTX: Hopper's warpgroup MMA and the Ampere-style warp MMA
_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_MMA_SYNC = re.compile(r"\bmma\.sync\b")
# plain global loads / stores: ld.global[.qualifiers][.vN].type (bytes = N x type width);
# qualifiers such as .nc, .L1::evict_last, .L2::cache_hint
_GLOBAL_LDST = re.compile(
    r"\b(?:ld|st)\.global(?:\.[A-Za-z0-9_:]+?)*?(?:\.v([248]))?\.[bfsu](8|16|32|64|128)\b")
_GLOBAL_ANY = re.compile(r"\b(?:ld|st)\.global\b")


def _access_bytes(ptx: str) -> list[int]:
    """The distinct widths, in bytes, of the plain global loads and stores in ``ptx`` (16 = a
    full 16-byte vector per thread; ``cp.async`` copies are not counted); -1 is added when an
    access was not understood, so a check for ``[16]`` cannot pass over it."""
    found = _GLOBAL_LDST.findall(ptx)
    widths = {int(n or 1) * int(bits) // 8 for n, bits in found}
    if len(found) != len(_GLOBAL_ANY.findall(ptx)):
        widths.add(-1)
    return sorted(widths)


@dataclasses.dataclass
class Compiled:
    kernel: str
    arch: int
    config: str
    regs: int | None
    stack_bytes: int | None  # the stack frame: where ptxas puts spilled registers
    shared: int
    seconds: float
    over_shared: bool
    fma_f32: int = 0  # fused fp32 multiply-adds in the PTX
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX (Hopper's warpgroup MMA)
    mma_sync: int = 0  # mma.sync instructions (warp-level MMA: Ampere's, and Hopper's fallback)
    access_bytes: list = dataclasses.field(default_factory=list)  # widths of global ld / st

    @property
    def hopper_fallback(self) -> bool:
        """A build for sm_90 whose dots are (partly) warp-level ``mma.sync``: Triton emits those
        on Hopper when a dot's tile is too small for a warpgroup MMA (fewer than 64 rows per
        warpgroup, e.g.); they run at a fraction of the wgmma rate."""
        return 90 <= self.arch < 100 and self.mma_sync > 0


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports ``target``; device 0, stream 0. Nothing is
    loaded or launched through it (the check compiles with ``warmup=True``)."""

    def __init__(self, target, shared_memory: int):
        self.target = target
        self.shared_memory = shared_memory  # per block: what launchers size their tiles by

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True

    def __getattr__(self, name):
        raise AttributeError(f"aot_check's stand-in driver has no {name!r} (a launch was attempted)")


def _cuobjdump() -> str | None:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else None


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack-frame bytes) of the cubin's kernel, from ``cuobjdump`` (ptxas spills
    registers to the stack frame; Triton kernels use no stack otherwise)."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


class Recorder:
    """Patches ``JITFunction.run``: compile for the current target (``warmup=True``), record the
    kernel's resources once per distinct compilation, enforce the shared-memory limit."""

    def __init__(self, shared_limit: int | None = None):
        self.arch = None
        self.shared_limit = shared_limit
        self.seen: dict[tuple, Compiled] = {}
        self._cleared: set = set()

    def install(self):
        from triton.runtime.jit import JITFunction
        orig = JITFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            key = (id(fn), rec.arch)
            if key not in rec._cleared:  # per-device caches were built for the previous target
                fn.device_caches.clear()
                rec._cleared.add(key)
            t0 = time.perf_counter()
            k = orig(fn, *args, grid=grid, warmup=True, **kwargs)
            rec.note(fn, k, kwargs, time.perf_counter() - t0)
            return k
        JITFunction.run = run

    def note(self, fn, k, kwargs, seconds):
        from triton.runtime.errors import OutOfResources
        md = k.metadata
        h = (fn.__name__, self.arch, md.hash)
        limit = self.shared_limit or SHARED_LIMIT.get(self.arch, 101376)
        if h not in self.seen:
            regs, stack = _resources(k.asm["cubin"])
            ptrs = sorted({t for t in k.src.signature.values() if str(t).startswith("*")})
            cfg = ", ".join([f"{n}={v}" for n, v in sorted(kwargs.items())
                             if isinstance(v, (bool, int, str)) and (n.isupper() or n.startswith("num_"))]
                            + ["/".join(ptrs)])
            ptx = k.asm["ptx"]
            self.seen[h] = Compiled(fn.__name__, self.arch, cfg, regs, stack, md.shared, seconds,
                                    md.shared > limit, len(_FMA_F32.findall(ptx)),
                                    len(_WGMMA.findall(ptx)), len(_MMA_SYNC.findall(ptx)),
                                    _access_bytes(ptx))
        if md.shared > limit:
            raise OutOfResources(md.shared, limit, "shared memory")


# ----------------------------------------------------------------------------------------------
# cases: (family, name, thunk) — each runs one op forward + backward with backend="triton"
# ----------------------------------------------------------------------------------------------
def _cases(quick: bool) -> list[tuple[str, str, Callable[[], None]]]:
    import torch
    import vidgen_kernels as vk

    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    out = []

    def add(family, name, fn):
        out.append((family, name, fn))

    def backward(outs, ins):
        outs = [o for o in outs if o is not None and o.requires_grad]
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.grad(outs, [i for i in ins if i is not None and i.requires_grad], grads,
                            allow_unused=True)

    def leaf(*shape, dtype):
        # values only matter where torch code reads them (routing); large inputs stay unfilled
        small = math.prod(shape) <= 1 << 20
        t = torch.randn(*shape).to(dtype) if small else torch.empty(*shape, dtype=dtype)
        return t.requires_grad_()

    # AdaLN: block size and warps follow C; flags: gated, norm kind, affine
    for dt in dtypes:
        for C in ((64, 3072) if quick else (64, 1152, 3072, 5120)):
            for gated, norm, affine in ((False, "layer", True), (True, "layer", True),
                                        (True, "rms", False), (False, "rms", False)):
                def f(dt=dt, C=C, gated=gated, norm=norm, affine=affine):
                    B, N = 2, 8
                    x = leaf(B, N, C, dtype=dt)
                    mod = leaf(B, 6 * C, dtype=dt)
                    shift, scale, gate = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]
                    w = leaf(C, dtype=dt) if affine else None
                    b = leaf(C, dtype=dt) if affine else None
                    if gated:
                        y = leaf(B, N, C, dtype=dt)
                        h, o = vk.gated_residual_adaln(x, y, gate, shift, scale, weight=w, bias=b,
                                                       norm=norm, backend="triton")
                        backward((h, o), (x, y, mod, w, b))
                    else:
                        o = vk.adaln_modulate(x, shift, scale, weight=w, bias=b, norm=norm,
                                              backend="triton")
                        backward((o,), (x, mod, w, b))
                add("adaln", f"{'gated' if gated else 'modulate'} {norm}{' affine' if affine else ''} "
                    f"C={C} {str(dt)[6:]}", f)

    # apply_rope: pair layout, table layout, head dim
    for dt in dtypes:
        for D in (64, 128):
            for interleaved in (True, False):
                def f(dt=dt, D=D, interleaved=interleaved):
                    x = leaf(1, 40, 16, D, dtype=dt)
                    cos, sin = vk.rope3d_freqs(2, 4, 4, D)
                    y = vk.apply_rope(x, cos, sin, interleaved=interleaved, offset=8, backend="triton")
                    backward((y,), (x,))
                add("rope", f"D={D} {'interleaved' if interleaved else 'half'} {str(dt)[6:]}", f)

    # RoPE-3D attention: head dim, rotation (interleaved / half / none = cross-attention),
    # frame-causal mask
    heads = (64, 128) if quick else (64, 128, 256)
    for dt in dtypes:
        for D in heads:
            for mode in ("interleaved", "half", "cross", "frame_causal", "jvp"):
                def f(dt=dt, D=D, mode=mode):
                    B, H, T, grid = 1, 2, 4, (2, 4, 4)
                    S = T + grid[0] * grid[1] * grid[2]
                    q, k, v = (leaf(B, S, H, D, dtype=dt) for _ in range(3))
                    if mode == "jvp":  # forward-mode: the forward kernel with JVP (frame-causal)
                        cos, sin = vk.rope3d_freqs(*grid, D)
                        torch.func.jvp(lambda q, k, v: vk.rope3d_attention(
                            q, k, v, cos, sin, rope_offset=T, frame_causal=True,
                            tokens_per_frame=16, backend="triton"), (q, k, v), (q, k, v))
                        return
                    if mode == "cross":
                        k, v = (leaf(B, 12, H, D, dtype=dt) for _ in range(2))
                        o = vk.rope3d_attention(q, k, v, backend="triton")
                    else:
                        cos, sin = vk.rope3d_freqs(*grid, D)
                        kw = dict(frame_causal=True, tokens_per_frame=16) if mode == "frame_causal" else {}
                        o = vk.rope3d_attention(q, k, v, cos, sin, rope_offset=T,
                                                interleaved=mode != "half", backend="triton", **kw)
                    backward((o,), (q, k, v))
                add("rope3d_attention", f"D={D} {mode} {str(dt)[6:]}", f)

    # temporal attention: head dim, frame count, RoPE, streaming; with S * H = 8192 sequences the
    # launcher packs several per program (SEQ_GROUPS > 1) and pipelines them (num_stages 2), as
    # at the benchmark shapes; with 12 it does not. T <= 8 packs 16 / next_pow2(T) sequences into
    # each 16-row tile (the block-diagonal path, down to one row per sequence at T = 1)
    def temporal(dt, D, T, rope, q_off, S, H):
        """Forward + backward of the op on ``[1, T - q_off | T, S, H, D]`` (RoPE over frames)."""
        def f():
            q = leaf(1, T - q_off, S, H, D, dtype=dt)
            k, v = (leaf(1, T, S, H, D, dtype=dt) for _ in range(2))
            cos = sin = None
            if rope:
                cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0))
            o = vk.temporal_attention(q, k, v, cos=cos, sin=sin, q_offset=q_off, backend="triton")
            backward((o,), (q, k, v))
        return f

    def temporal_name(D, T, rope, q_off, dt):
        return f"D={D} T={T}{' rope' if rope else ''}{f' q_offset={q_off}' if q_off else ''} " \
            f"{str(dt)[6:]}"

    for dt in dtypes:
        for D in (64, 128):
            for T, rope, q_off, S in ((16, True, 0, 6), (16, False, 0, 1024), (32, True, 0, 1024),
                                      (13, True, 12, 6), (4, True, 0, 1024), (1, False, 0, 1024),
                                      (8, True, 7, 6)) if not quick else \
                    ((16, True, 0, 6), (16, False, 0, 1024), (13, True, 12, 6),
                     (4, True, 0, 1024)):
                name = temporal_name(D, T, rope, q_off, dt).replace(f"T={T}", f"T={T} S={S}", 1)
                add("temporal_attention", name,
                    temporal(dt, D, T, rope, q_off, S, 2 if S < 1024 else 8))

    # temporal attention at the largest tiles its shared-memory rule lets through on the target
    # (tile_error: float32 padded T_k x D = 8192 on sm_80 / sm_90, 4096 on ~99 KiB GPUs; 16-bit
    # T_k = 128, at D = 256 on ~99 KiB GPUs 32), and bf16 T = 49 at D = 64 (sm_80 spills). Where
    # the resident builds spill heavily the launchers take the tiled kernels instead (fp32 8192-
    # element tiles, long backwards: temporal_attention._TILED_FROM), so those are what is built
    if not quick:
        from . import temporal_attention as tk

        def longest(dt, D):
            from triton.runtime import driver
            shared = getattr(driver.active, "shared_memory", None)
            return next(T for T in (128, 64, 32, 16) if tk.tile_error(T, D, dt, shared) is None)
        for dt, D, T in ((torch.float32, 64, None), (torch.float32, 128, None),
                         (torch.float32, 256, None), (torch.bfloat16, 64, 49),
                         (torch.bfloat16, 128, None), (torch.bfloat16, 256, None)):
            def f(dt=dt, D=D, T=T):
                T = T or longest(dt, D)
                B, S, H = 1, 256, 4  # one sequence per program at these tiles, as at any S
                q, k, v = (leaf(B, T, S, H, D, dtype=dt) for _ in range(3))
                cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0))
                o = vk.temporal_attention(q, k, v, cos=cos, sin=sin, backend="triton")
                backward((o,), (q, k, v))
            add("temporal_attention", f"D={D} T={T or 'longest'} S=256 rope {str(dt)[6:]} "
                f"(largest tiles)", f)

    # temporal attention beyond what the resident kernels hold: the tiled kernels (forward, dq,
    # dk / dv) at every head dim, RoPE, streaming (a 1-frame query block)
    for dt in dtypes:
        for D, T, q_off, rope in (((64, 200, 0, True), (128, 160, 0, True), (256, 144, 0, True),
                                   (128, 200, 199, True), (128, 200, 0, False)) if not quick
                                  else ((128, 160, 0, True),)):
            add("temporal_attention", "tiled " + temporal_name(D, T, rope, q_off, dt),
                temporal(dt, D, T, rope, q_off, 16, 2))

    # MoE: plain and gated activations, bias, widths that are not tile multiples; few rows per
    # expert (64-row tiles) and many (N=1024: the 128-row tiles of 16-bit GPU builds)
    for dt in dtypes:
        for act, bias, N in (("gelu", True, 40), ("swiglu", False, 40), ("gelu", True, 1024),
                             ("swiglu", False, 1024)) if quick else \
                (("gelu", True, 40), ("gelu_exact", False, 40), ("silu", True, 40),
                 ("swiglu", False, 40), ("geglu", True, 40), ("gelu", True, 1024),
                 ("swiglu", False, 1024)):
            def f(dt=dt, act=act, bias=bias, N=N):
                C, F, E = 96, 160, 4
                g = 2 if act in ("swiglu", "geglu") else 1
                x = leaf(N, C, dtype=dt)
                logits = leaf(N, E, dtype=torch.float32)
                w1, w2 = leaf(E, C, g * F, dtype=dt), leaf(E, F, C, dtype=dt)
                b1 = leaf(E, g * F, dtype=dt) if bias else None
                b2 = leaf(E, C, dtype=dt) if bias else None
                r = vk.moe_ffn(x, logits, w1, w2, top_k=2, activation=act, b1=b1, b2=b2,
                               backend="triton")
                backward((r.out, r.aux_loss), (x, logits, w1, w2, b1, b2))
            add("moe", f"{act}{' bias' if bias else ''} N={N} {str(dt)[6:]}", f)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80],
                    help="compute capabilities to compile for (default: 90 80)")
    ap.add_argument("--quick", action="store_true", help="bf16 + fp32 and fewer sizes (CI)")
    ap.add_argument("--only", default="", help=f"comma-separated families of {FAMILIES}")
    ap.add_argument("--case", default="", help="only the cases whose name matches this regex")
    ap.add_argument("--shared-limit", type=int, default=None, metavar="BYTES",
                    help="per-block shared-memory limit instead of the target's (e.g. to see "
                         "the launchers' fallbacks, or a GPU with less shared memory)")
    ap.add_argument("--json", help="write the per-kernel table here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: TRITON_INTERPRET is set; run in a process without it", file=sys.stderr)
        return 2
    only = set(filter(None, a.only.split(",")))
    if only - set(FAMILIES):
        print(f"aot_check: --only: unknown families {sorted(only - set(FAMILIES))}; "
              f"choose from {FAMILIES}", file=sys.stderr)
        return 2

    # Triton >= 3.9 warns when this knob is unset; 1 is the behaviour of earlier releases (the
    # GPU machine's 3.6) and of 3.9's default
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    import vidgen_kernels.backends as backends
    # the ops accept CPU tensors for "triton" only under the interpreter: let them through the
    # backend check; the kernels' own triton_interpret() stays False (TRITON_INTERPRET is unset),
    # so they pick their GPU configurations
    why = backends.why_unavailable
    backends.why_unavailable = lambda name, device=None: (
        None if name == "triton" else why(name, device))
    # launchers that size their tiles by the GPU's shared memory ask the stand-in driver's
    # (_launch.target_shared_memory: CPU tensors here)
    rec = Recorder(a.shared_limit)
    rec.install()
    torch.manual_seed(0)
    failures = []
    cases = [c for c in _cases(a.quick) if (not only or c[0] in only)
             and (not a.case or re.search(a.case, c[1]))]
    if not cases:
        print("aot_check: no case matches --only / --case", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    from vidgen_kernels.triton_kernels import _launch
    for arch in a.arch:
        rec.arch = arch
        driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32),
                                        a.shared_limit or SHARED_LIMIT.get(arch, 101376)))
        _launch._STAGES_FALLBACK.clear()  # the launchers' shared-memory fallbacks are per target
        for family, name, fn in cases:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append((arch, family, name, f"{type(e).__name__}: {str(e).strip()[:2000]}"))

    rows = sorted(rec.seen.values(), key=lambda c: (c.arch, c.kernel, c.config))
    for c in rows:
        if c.kernel in BIT_EXACT and c.fma_f32:
            failures.append((c.arch, "bit-exact", c.config,
                             f"{c.kernel} has {c.fma_f32} fma.rn.f32 in its PTX: its contract rounds "
                             f"each product and sum apart (launch it with enable_fp_fusion=False)"))
    print(f"{'arch':>4}  {'kernel':<28} {'regs':>4} {'stack B':>7} {'shared B':>8} {'fma':>4} "
          f"{'wgmma':>5} {'mma.s':>5} {'s':>5}  config")
    for c in rows:
        flag = "  OVER the shared-memory limit" if c.over_shared else ""
        print(f"sm{c.arch:<2}  {c.kernel:<28} {c.regs if c.regs is not None else '?':>4} "
              f"{c.stack_bytes if c.stack_bytes is not None else '?':>7} {c.shared:>8} {c.fma_f32:>4} "
              f"{c.wgmma:>5} {c.mma_sync:>5} {c.seconds:>5.1f}  {c.config}{flag}")
    spills = [c for c in rows if c.stack_bytes]
    fallback = sorted({c.kernel for c in rows if c.hopper_fallback})
    print(f"aot_check: {len(cases)} cases x {len(a.arch)} targets, {len(rows)} distinct kernels "
          f"compiled in {time.perf_counter() - t_start:.0f} s; {len(spills)} spill registers to "
          f"the stack (max {max((c.stack_bytes for c in spills), default=0)} B); "
          f"{sum(c.hopper_fallback for c in rows)} sm_90 builds with mma.sync dots"
          f"{' (' + ', '.join(fallback) + ')' if fallback else ''}; {len(failures)} failed")
    for arch, family, name, err in failures:
        print(f"FAILED sm{arch} {family}: {name}: {err}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kernels": [dataclasses.asdict(c) for c in rows],
                       "failures": [dict(zip(("arch", "family", "case", "error"), x)) for x in failures]},
                      f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
