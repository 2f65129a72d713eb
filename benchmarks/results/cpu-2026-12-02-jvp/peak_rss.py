"""Peak resident memory of one ``torch.func.jvp`` of RoPE-3D attention per contender, each in a
fresh process (``ru_maxrss`` after the call minus before it): the CPU picture of what the
forward-mode path saves. Usage: ``python peak_rss.py [video_frames]`` (default 8: 8x16x16 + 16
text tokens, H = 4, D = 64, fp32, no mask)."""
import json
import subprocess
import sys

CHILD = r"""
import resource, sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import vidgen_kernels as vk
frames, which = int(sys.argv[1]), sys.argv[2]
text, H, D = 16, 4, 64
S = text + frames * 256
g = torch.Generator().manual_seed(0)
qkv, tan = torch.randn(1, S, 3, H, D, generator=g), torch.randn(1, S, 3, H, D, generator=g)
cos, sin = vk.rope3d_freqs(frames, 16, 16, D)

def ours(qkv, backend):
    q, k, v = qkv.unbind(2)
    return vk.rope3d_attention(q, k, v, cos, sin, rope_offset=text, backend=backend)

def rot_sdpa(qkv):  # diffusers' way on SDPA's math backend (the one with forward AD)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    def rot(x):
        c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        xv = x[:, :, text:]
        xr, xi = xv.reshape(*xv.shape[:-1], -1, 2).unbind(-1)
        return torch.cat([x[:, :, :text], xv * c + torch.stack([-xi, xr], -1).flatten(-2) * s], 2)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(rot(q), rot(k), v).transpose(1, 2)

f = {"cpu": lambda x: ours(x, "cpu"), "reference": lambda x: ours(x, "reference"),
     "rotate+sdpa-math": rot_sdpa}[which]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, t = torch.func.jvp(f, (qkv,), (tan,))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""

frames = sys.argv[1] if len(sys.argv) > 1 else "8"
res = {}
for which in ("cpu", "reference", "rotate+sdpa-math"):
    r = subprocess.run([sys.executable, "-c", CHILD, frames, which], capture_output=True,
                       text=True, check=True)
    res[which] = int(r.stdout.strip().splitlines()[-1])
print(json.dumps({"frames": int(frames), "peak_rss_delta_bytes": res}, indent=1))
