"""Sweep the tiles of the temporal attention's tiled kernels (AOT builds, no GPU): every
candidate ``BLOCK_MxBLOCK_NxWARPS`` for all three kernels, T_k = 160, RoPE, causal.

    env -u TRITON_INTERPRET python sweep_tiled_tiles.py 90,80 fp32 64,128,256 16x16x8,32x32x8 out.json

(the committed logs: ``tiles-*.log``; columns arch, D, tile, kernel, registers, stack bytes,
shared bytes, over the limit)"""
import itertools, json, os, sys
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import vidgen_kernels as vk
import vidgen_kernels.backends as backends
import vidgen_kernels.triton_kernels.temporal_attention as tk
from vidgen_kernels.triton_kernels import _launch, aot_check as ac
why = backends.why_unavailable
backends.why_unavailable = lambda name, device=None: None if name == "triton" else why(name, device)
archs = [int(a) for a in sys.argv[1].split(",")]
dts = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
Ds = [int(x) for x in sys.argv[3].split(",")]
cands = [tuple(int(y) for y in c.split("x")) for c in sys.argv[4].split(",")]
out = sys.argv[5]
rec = ac.Recorder(None)
rec.install()
res = []
for arch in archs:
    rec.arch = arch
    driver.set_active(ac._TargetDriver(GPUTarget("cuda", arch, 32), ac.SHARED_LIMIT[arch]))
    for D, (bm, bn, w) in itertools.product(Ds, cands):
        _launch._STAGES_FALLBACK.clear()
        tk._tiled_tiles = lambda kernel, q, D_, block_m, block_n, num_warps, bm=bm, bn=bn, w=w: (bm, bn, w)
        T = 160
        q, k, v = (torch.empty(1, T, 16, 2, D, dtype=dts).requires_grad_() for _ in range(3))
        cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0))
        n0 = len(rec.seen)
        try:
            o = vk.temporal_attention(q, k, v, cos=cos, sin=sin, backend="triton")
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
            err = ""
        except Exception as e:
            err = str(e)[:200]
        new = list(rec.seen.values())[n0:]
        for c in new:
            print(arch, D, f"{bm}x{bn}x{w}", c.kernel, c.regs, c.stack_bytes, c.shared, c.over_shared, flush=True)
            res.append(dict(arch=arch, D=D, tile=[bm, bn, w], kernel=c.kernel, regs=c.regs, stack=c.stack_bytes, shared=c.shared, over=c.over_shared))
        if err: print("ERR", arch, D, bm, bn, w, err)
json.dump(res, open(out, "w"), indent=1)
