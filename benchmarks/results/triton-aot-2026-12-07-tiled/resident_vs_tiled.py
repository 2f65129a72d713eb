"""AOT builds of the temporal attention's resident and tiled kernels side by side (no GPU):
registers / spills / shared memory per kernel for T_k x head_dim x dtype, RoPE, causal.

    env -u TRITON_INTERPRET python resident_vs_tiled.py 90,80 bf16 64,128 32,64,128 out.json

(run from the repository root with the package importable; the committed log and JSON are this
call's output)
"""
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
dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[2]]
Ds = [int(x) for x in sys.argv[3].split(",")]
Ts = [int(x) for x in sys.argv[4].split(",")]
out = sys.argv[5]
rec = ac.Recorder(None)
rec.install()
res = []
real_max = tk.RESIDENT_MAX_T
tk._resident_spills = lambda *a: False  # the resident builds where they fit (the rule this measured)
for arch in archs:
    rec.arch = arch
    driver.set_active(ac._TargetDriver(GPUTarget("cuda", arch, 32), ac.SHARED_LIMIT[arch]))
    for D, T, path in itertools.product(Ds, Ts, ("resident", "tiled")):
        _launch._STAGES_FALLBACK.clear()
        tk.RESIDENT_MAX_T = real_max if path == "resident" else 0
        q, k, v = (torch.empty(1, T, 256, 4, D, dtype=dt).requires_grad_() for _ in range(3))
        cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0))
        n0 = len(rec.seen)
        err = ""
        try:
            o = vk.temporal_attention(q, k, v, cos=cos, sin=sin, backend="triton")
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        except Exception as e:  # noqa: BLE001 - recorded
            err = str(e)[:200]
        for c in list(rec.seen.values())[n0:]:
            row = dict(arch=arch, dtype=sys.argv[2], D=D, T=T, path=path, kernel=c.kernel,
                       regs=c.regs, stack=c.stack_bytes, shared=c.shared, over=c.over_shared,
                       config=c.config)
            res.append(row)
            print(arch, D, T, path, c.kernel, c.regs, c.stack_bytes, c.shared, c.over_shared, flush=True)
        if err:
            print("ERR", arch, D, T, path, err, flush=True)
json.dump(res, open(out, "w"), indent=1)
