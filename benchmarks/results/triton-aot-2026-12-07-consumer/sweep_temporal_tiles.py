"""Build the Triton temporal attention (forward + backward) for every padded tile, T_k in
{16, 32, 64, 128} x head_dim in {32, 64, 128, 256}, float32 and bf16, with and without RoPE, for
the given targets under a shared-memory limit, with the launchers' tile rule switched off: which
builds fit a GPU with that much shared memory per block (one pipeline stage as the fallback).

    env -u TRITON_INTERPRET python sweep_temporal_tiles.py 86,120 101376 out.json [DTYPE D]
"""
import itertools
import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

import vidgen_kernels as vk  # noqa: E402
import vidgen_kernels.backends as backends  # noqa: E402
import vidgen_kernels.ops.temporal_attention as top  # noqa: E402
import vidgen_kernels.triton_kernels.temporal_attention as tk  # noqa: E402
from vidgen_kernels.triton_kernels import _launch, aot_check as ac  # noqa: E402

tk.tile_error = lambda *a, **k: None  # measure the builds, not the rule
top._tile_error = lambda *a, **k: None
why = backends.why_unavailable
backends.why_unavailable = lambda name, device=None: None if name == "triton" else why(name, device)
archs, limit, out = [int(a) for a in sys.argv[1].split(",")], int(sys.argv[2]), sys.argv[3]
only = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else None
rec = ac.Recorder(limit)
rec.install()
res = []
for arch in archs:
    rec.arch = arch
    driver.set_active(ac._TargetDriver(GPUTarget("cuda", arch, 32), limit))
    _launch._STAGES_FALLBACK.clear()
    for dt, D, T, rope in itertools.product((torch.float32, torch.bfloat16), (32, 64, 128, 256),
                                            (16, 32, 64, 128), (True, False)):
        if only and (str(dt)[6:], D) != only:
            continue
        q, k, v = (torch.empty(1, T, 256, 4, D, dtype=dt).requires_grad_() for _ in range(3))
        cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0)) if rope else (None, None)
        ok, err = True, ""
        try:
            o = vk.temporal_attention(q, k, v, cos=cos, sin=sin, backend="triton")
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        except Exception as e:  # noqa: BLE001 - recorded
            ok, err = False, str(e)[:300]
        res.append(dict(arch=arch, dtype=str(dt)[6:], D=D, T=T, rope=rope, ok=ok, err=err))
        print(arch, str(dt)[6:], D, T, rope, "OK" if ok else "FAIL " + err[:120], flush=True)
rows = [dict(kernel=c.kernel, arch=c.arch, config=c.config, shared=c.shared, stack=c.stack_bytes)
        for c in rec.seen.values()]
with open(out, "w") as f:
    json.dump(dict(cases=res, kernels=rows), f, indent=1)
