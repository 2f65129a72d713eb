import torch, time, json, sys
import vidgen_kernels.ops.rope3d_attention as ra


def _unit_last(t):  # the old path's copy of inputs with a non-unit last stride (gone since b39fa3f)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def old_fwd(q, k, v, cos, sin, off, inter, fs, fl, fb, scale):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    qr = ra._rope_cpu(q, cos, sin, off, inter, heads_major=True); kr = ra._rope_cpu(k, cos, sin, off, inter, heads_major=True)
    allowed = ra.frame_causal_mask(q.shape[1], fs, fl, fb, q.device)
    mask = torch.zeros(q.shape[1], q.shape[1], dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
    o, l_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qr, kr, v.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).contiguous(), l_.transpose(1, 2).contiguous()
def old_bwd(dout, q, k, v, cos, sin, out, lse, off, inter, fs, fl, fb, scale):
    qr = ra._rope_cpu(q, cos, sin, off, inter, heads_major=True); kr = ra._rope_cpu(k, cos, sin, off, inter, heads_major=True)
    allowed = ra.frame_causal_mask(q.shape[1], fs, fl, fb, q.device)
    mask = torch.zeros(q.shape[1], q.shape[1], dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout.transpose(1, 2), qr, kr, v.transpose(1, 2), out.transpose(1, 2), lse.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    dq = ra._rope_cpu(_unit_last(dq), cos, sin, off, inter, conj=True); dk = ra._rope_cpu(_unit_last(dk), cos, sin, off, inter, conj=True)
    return dq, dk, dv
def tm(f, r=15):
    for _ in range(3): f()
    ts = []
    for _ in range(r):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2] * 1e3
rows = []
for (F_, fpb, H) in [(4, 1, 4), (8, 1, 4), (8, 2, 4), (4, 1, 8)]:
    text, tpf, D = 16, 256, 64
    L = F_ * tpf; S = text + L
    qkv = torch.randn(1, S, 3, H, D); q, k, v = qkv.unbind(2); do = torch.randn(1, S, H, D)
    ang = torch.rand(L, D // 2) * 6; cos, sin = ang.cos(), ang.sin()
    a = (cos, sin, text, True, text, L, tpf * fpb, D ** -0.5)
    o, l = ra.kernel_fwd_cpu(q, k, v, *a)
    r = dict(video=f"{F_}x16x16", frames_per_block=fpb, H=H,
             old_fwd_ms=tm(lambda: old_fwd(q, k, v, *a)), new_fwd_ms=tm(lambda: ra.kernel_fwd_cpu(q, k, v, *a)),
             old_bwd_ms=tm(lambda: old_bwd(do, q, k, v, cos, sin, o, l, *a[2:])), new_bwd_ms=tm(lambda: ra.kernel_bwd_cpu(do, q, k, v, cos, sin, o, l, *a[2:])))
    rows.append(r); print(r, flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
