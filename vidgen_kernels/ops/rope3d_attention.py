"""Fused RoPE-3D + flash attention over a joint text/video token sequence (issue 3).

``rope3d_attention(q, k, v, cos, sin, ...)`` is full (self-)attention on ``[B, S, H, D]`` tokens in
which q and k are rotated on the fly at the video positions ``rope_offset .. rope_offset + L - 1``
(``L = len(cos)``); tokens outside that range (text) are not rotated. Text-first models
(CogVideoX: ``cat([text, video])``) pass ``rope_offset = text_len``; text-last models
(HunyuanVideo: ``cat([video, text])``) pass ``rope_offset = 0`` and a table as long as the video.
Without tables it is plain flash attention, and then k/v may be longer or shorter than q
(cross-attention to text, as Wan).

Frame-causal (block-causal) mask (``frame_causal=True``)
--------------------------------------------------------
The *video range* is ``[V0, V1)`` with ``V0 = rope_offset`` and ``V1 = V0 + L`` (``L = len(cos)``;
without tables ``V1 = S``). Video token ``i`` is in frame ``(i - V0) // tokens_per_frame`` and
block ``blk(i) = (i - V0) // (tokens_per_frame * frames_per_block)``. Every other token is
*text* (prefix before ``V0``, suffix after ``V1``). Then query ``i`` may attend key ``j`` iff

* ``j`` is text (every query sees all text tokens, prefix and suffix), or
* ``i`` and ``j`` are video and ``blk(j) <= blk(i)`` (own block and earlier blocks).

So **text queries attend to text only**, never to video. This is the choice that keeps the
whole network frame-causal: if text tokens attended to video, a text token's output in layer
``l`` would carry information from the last frames, and in layer ``l + 1`` every frame (frame 0
included) would read it back through its text keys, leaking the future into the past. With this
rule the output of any token depends only on text and on blocks ``<= `` its own, in every layer,
which is what streaming generation with a KV cache needs (CausVid / Self-Forcing use the same
block-causal rule over frames; they route text through cross-attention, where this question
does not arise). The text stream then behaves as a bidirectional text encoder inside the joint
attention, and a KV cache of the text tokens is computed once. ``rope3d_attention_reference``
builds exactly this boolean mask (:func:`frame_causal_mask`).

Backends
--------
* ``reference``: eager rotation + materialised softmax attention with the explicit boolean mask
  (fp32 math; fp64 for fp64 inputs). Any device and float dtype; autograd through PyTorch ops
  (saves the ``S x S`` probabilities: for tests and small shapes).
  Where ``auto`` finds no kernel for a call (a GPU below sm_80 such as a T4 / V100, a head_dim
  beyond a kernel's limit, a CPU without the compiled extension), it runs
  :func:`rope3d_attention_sdpa` instead: rotation + ``scaled_dot_product_attention``, memory
  linear in S (the reference runs only when asked for, for fp64, and under autodiff transforms).
* ``triton`` (``vidgen_kernels/triton_kernels/rope3d_attention.py``): FA2 forward with the rotation
  applied to q / k tiles on load, backward kernels that re-rotate on load and un-rotate dq / dk
  on store, frame-causal tile skipping. CUDA (CPU under ``TRITON_INTERPRET=1``), fp16 / bf16 /
  fp32, ``D <= 256``.
* ``cpu``: the C++ kernel of ``csrc/attention_cpu.cpp`` (q / k rotated as they are gathered,
  any strides read in place, exact softmax over whole key rows one block of queries at a time,
  every product a BLAS call), which computes only the key ranges a query block can see: no
  ``S x S`` mask is made and fully masked key ranges cost nothing (ATen's kernel takes only a
  dense mask and skips nothing; the C++ kernel is 1.5-2.6x faster forward and backward with
  blocks of one or two frames at 4x16x16 / 8x16x16,
  ``benchmarks/results/cpu-2026-12-01-frame-causal``). Unmasked, its forward + backward costs
  what ATen's flash kernel's does (2-core Zen VM, S = 256 .. 2064) and stays within the 2x rule
  where ATen's does not (fp32 gradients at 3-8x the fp32 reference's error at head_dim 80 ..
  160 with peaked softmaxes: ATen's forward lse is a few ulp of the scores' magnitude off).
  Inference (nothing requires grad), unmasked, fp32, unit last stride: q / k rotated out of place
  by the C++ RoPE kernel into ``[B, H, S, D]`` buffers, then ATen's flash forward
  (``aten::_scaled_dot_product_flash_attention_for_cpu``), 6-9 % faster; not in fp16 / bf16,
  where ATen's kernel turns a row with an inf score into zeros instead of NaN, nor where the
  rotated q / k hold a NaN or inf (its fp32 kernel turns such a query's row into zeros).

Forward-mode AD (``torch.func.jvp`` alone, or a ``torch.autograd.forward_ad`` dual level; eager):
the kernels run, through ``_Rope3dAttnForwardAD`` (the kernels' forward and backward plus a
``jvp``): the tangent of ``out`` comes from ``kernel_jvp_torch`` (``cpu``: PyTorch over blocks of
queries) or the Triton forward kernel with ``JVP`` (``triton``), memory ``O(rows x S)``, never the
``S x S`` matrix of differentiating the reference. A tangent on the tables, ``jacfwd``, nested
jvp and compiled jvp take the reference (``backends.autodiff_transform``).

Layers, top to bottom: the public ``rope3d_attention`` (checks, table canonicalisation, backend
choice); the PyTorch reference; the custom ops ``vidgen_kernels::rope3d_attn_fwd`` / ``_bwd``
(fakes, autograd saving only q, k, v, out, lse and the small tables); the kernel backends.

Kernel contract (``torch``, ``cpu`` and ``triton`` implement it, same argument order)
-------------------------------------------------------------------------------------
``fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale)
-> (out, lse)``

* ``q``: ``[B, Sq, H, D]``, ``k``, ``v``: ``[B, Sk, H, D]``, one dtype ``T``, any strides.
* ``cos``, ``sin``: ``None`` or ``[L, D/2]`` float32 contiguous, ``rope_offset + L <= Sq = Sk``.
* ``fc_block``: 0 for no mask, else the tokens of one block (``tokens_per_frame *
  frames_per_block``; a block longer than the video is the whole video) of the video range
  ``[fc_start, fc_start + fc_len)`` (``Sq = Sk`` then).
* ``out``: ``[B, Sq, H, D]`` contiguous ``T``; ``lse``: ``[B, Sq, H]`` contiguous float32.
* ``qr_i = round_T(rot(q_i, i - rope_offset))`` for ``rope_offset <= i < rope_offset + L``, else
  ``q_i`` (likewise ``kr_j``); ``z_ij = scale <qr_i, kr_j>`` (fp32), ``-inf`` where the mask
  forbids; ``out_i = softmax_j(z_i) v``; ``lse_i = log sum_j exp(z_ij)`` (natural log).

``bwd(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len, fc_block,
scale) -> (dq, dk, dv)`` contiguous ``[B, S, H, D]`` ``T``: FA2 math (``delta_i = <dout_i,
out_i>``, ``p = exp(z - lse)``, ``ds = p (dp - delta)``; the ``cpu`` kernel in fp16 / bf16
takes the equal ``delta_i = sum_j p_ij dp_ij`` with ``p`` renormalised over the row its block
holds, since the rounded ``out`` puts an error in ``delta`` that dq multiplies by the keys'
common component), ``dq``/``dk`` un-rotated (rotation by the negative angle) at the rotated
positions.

``jvp(q, k, v, dq, dk, dv, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale)
-> dout`` contiguous ``[B, Sq, H, D]`` ``T`` (``torch``/``cpu``: ``kernel_jvp_torch``; ``triton``):
the tangent of ``out`` along the tangents of q, k, v (any strides; stride 0 for a zero one):
``dz = scale (<rot(dq_i), kr_j> + <qr_i, rot(dk_j)>)``, ``mu_i = sum_j p_ij dz_ij``,
``dout_i = sum_j p_ij ((dz_ij - mu_i) v_j + dv_j)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._eager import differentiable_vjp, eager_op, recomputed_vjp
from ..backends import (autodiff_transform, current_backend, forward_ad_active, may_fall_back,
                        resolve)
from ._checks import (autocast_dtype, cast_floating, check_flags, check_qkv, check_sizes,
                      got_int, softmax_scale_or_default)
from .rope import _rope_kernel, apply_rope, canon_table, check_rope_pair, rotate, table_grads

__all__ = ["rope3d_attention", "rope3d_attention_reference", "rope3d_attention_sdpa",
           "frame_causal_mask"]

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
MAX_D = {"cpu": 4095, "triton": 256}  # cpu: its C++ kernel (frame_causal, strided) takes D < 4096


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_inputs(q, k, v, cos, sin, rope_offset, interleaved, frame_causal, tokens_per_frame,
                  frames_per_block, softmax_scale, op):
    """Validate; return (cos, sin canonicalised to [L, D/2] fp32 or None, fc_start, fc_len,
    fc_block, scale)."""
    check_flags(op, interleaved=interleaved, frame_causal=frame_causal)
    check_qkv(q, k, v, "[B, S, H, D]", op)
    B, Sq, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{op}: k/v batch {k.shape[0]} != q batch {B}")
    if k.shape[2] != H:
        raise ValueError(f"{op}: k/v have {k.shape[2]} heads but q has {H} (heads must match)")
    if k.shape[3] != D:
        raise ValueError(f"{op}: k/v head_dim {k.shape[3]} != q head_dim {D}")
    if D == 0:
        raise ValueError(f"{op}: head_dim must be >= 1, got shape {tuple(q.shape)}")
    Sk = k.shape[1]
    check_sizes(op, 0, rope_offset=rope_offset)
    softmax_scale = softmax_scale_or_default(softmax_scale, D, op)
    rope = check_rope_pair(cos, sin, op) is not None
    if (rope or frame_causal) and Sk != Sq:
        raise ValueError(f"{op}: RoPE tables and frame_causal need self-attention (k/v as long as "
                         f"q), got S_q={Sq}, S_k={Sk}")
    if rope:
        if D % 2:
            raise ValueError(f"{op}: RoPE needs an even head_dim, got D={D}")
        L = cos.shape[0] if isinstance(cos, Tensor) and cos.dim() >= 1 else 0
        if L > Sq - rope_offset:
            raise ValueError(f"{op}: the RoPE table has {int(L)} positions but only S - rope_offset "
                             f"= {int(Sq)} - {int(rope_offset)} = {int(Sq - rope_offset)} tokens "
                             f"follow rope_offset")
        fp64 = q.dtype == torch.float64  # (only reference runs fp64: it keeps fp64 tables)
        cos = canon_table("cos", cos, D, L, q.device, op, interleaved, fp64)
        sin = canon_table("sin", sin, D, L, q.device, op, interleaved, fp64)
        video_len = L
    else:
        cos = sin = None
        if rope_offset > Sq:
            raise ValueError(f"{op}: rope_offset={int(rope_offset)} is beyond the sequence "
                             f"(S={int(Sq)})")
        video_len = Sq - rope_offset
    fc_block = 0
    if frame_causal:
        if not _is_int(tokens_per_frame) or tokens_per_frame < 1:
            raise ValueError(f"{op}: frame_causal needs tokens_per_frame, a Python int >= 1, got "
                             f"{got_int(tokens_per_frame)}")
        check_sizes(op, frames_per_block=frames_per_block)
        if video_len % tokens_per_frame:
            raise ValueError(f"{op}: tokens_per_frame={tokens_per_frame} does not divide the video "
                             f"length {video_len} (tokens rope_offset .. rope_offset + "
                             f"{'len(cos)' if rope else 'S'} - 1)")
        fc_block = tokens_per_frame * frames_per_block
        # a block at least as long as the video is the whole video: clamped (here in eager
        # code, on plain ints; the custom ops' implementations clamp again on the concrete
        # values), so that the kernels' index sums cannot overflow (2**63 - 1 frames gave NaN on
        # cpu). Not while compiling: min() on symbolic sizes is a guard (`tokens_per_frame >=
        # L` recompiled the next size in a CI run); there only kept within the ops' int64
        # argument (plain ints: no guard), frames_per_block=sys.maxsize overflowed it
        if not torch.compiler.is_compiling():
            fc_block = min(fc_block, max(video_len, 1))
        elif isinstance(fc_block, int):
            fc_block = min(fc_block, 2 ** 62)
    # video_len stays a symbolic size under torch.export / dynamic shapes (int() would pin it)
    return cos, sin, rope_offset, video_len, fc_block, float(softmax_scale)


# ----------------------------------------------------------------------------------------------
# reference and the contract in PyTorch
# ----------------------------------------------------------------------------------------------
def _sym_max(a, b):
    """``max`` of two sizes: ``torch.sym_max`` when one is a SymInt (no guard on a symbolic
    size), builtin ``max`` on plain ints (torch 2.11's dynamo cannot trace ``torch.sym_max`` on
    ints: "torch.* op returned non-Tensor"; under dynamo builtin min / max of a symbolic size
    is itself a guard-free sym_max)."""
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) \
        else max(a, b)


def _sym_min(a, b):
    """``min`` of two sizes, as :func:`_sym_max`."""
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) \
        else min(a, b)


def frame_causal_mask(S: int, fc_start: int, fc_len: int, fc_block: int, device=None,
                      rows: Optional[slice] = None) -> Tensor:
    """``[S, S]`` boolean, True where query ``i`` may attend key ``j`` (module docstring); only
    the query rows ``rows`` (``[len(rows), S]``) when given."""
    # block index per token, -1 for text (built without integer division of a tensor, which
    # inductor fails to compile on torch 2.13)
    # a block longer than the video is the whole video: no index of fb entries (a huge
    # frames_per_block asked for terabytes). On symbolic sizes an expression without the guard
    # (a recompile per size) that a comparison would add: see _sym_min / _sym_max
    fb = _sym_min(_sym_max(fc_block, 1), _sym_max(fc_len, 1))
    blk = torch.arange(-(-fc_len // fb), device=device).repeat_interleave(fb)[:fc_len]
    blk = torch.cat([blk.new_full((fc_start,), -1), blk, blk.new_full((S - fc_start - fc_len,), -1)])
    vid = blk >= 0
    qblk, qvid = (blk, vid) if rows is None else (blk[rows], vid[rows])
    return (~vid)[None, :] | (qvid[:, None] & (blk[None, :] <= qblk[:, None]))


def _rope_torch(x: Tensor, cos, sin, offset: int, interleaved: bool) -> Tensor:
    """Rotate ``x [B, S, H, D]`` at positions ``offset .. offset + L - 1`` (out of place)."""
    if cos is None:
        return x
    L = cos.shape[0]
    c, s = cos[:, None, :], sin[:, None, :]
    mid = rotate(x[:, offset:offset + L], c, s, interleaved)
    if offset == 0 and L == x.shape[1]:
        return mid
    return torch.cat([x[:, :offset], mid, x[:, offset + L:]], dim=1)


def _attend(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale):
    """Eager rotation + materialised softmax attention (fp32 math, fp64 for fp64).
    Returns (out [B, Sq, H, D] in fp32/fp64, lse [B, Sq, H], qr, kr)."""
    qr = _rope_torch(q, cos, sin, rope_offset, interleaved)
    kr = _rope_torch(k, cos, sin, rope_offset, interleaved)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.to(acc).transpose(1, 2) for t in (qr, kr, v))  # [B, H, S, D]
    z = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if fc_block:
        allowed = frame_causal_mask(q.shape[1], fc_start, fc_len, fc_block, q.device)
        z = z.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    out = torch.matmul(torch.softmax(z, dim=-1), vh)
    return out.transpose(1, 2), lse.transpose(1, 2), qr, kr


def rope3d_attention_reference(q, k, v, cos=None, sin=None, *, rope_offset=0, interleaved=True,
                               frame_causal=False, tokens_per_frame=None, frames_per_block=1,
                               softmax_scale=None):
    """Eager PyTorch: rotate q/k, materialise the (masked) softmax attention in fp32 (fp64 for
    fp64 inputs). Same signature and result as :func:`rope3d_attention`."""
    op = "rope3d_attention_reference"
    cos, sin, off, fl, fb, scale = _check_inputs(q, k, v, cos, sin, rope_offset, interleaved,
                                                 frame_causal, tokens_per_frame, frames_per_block,
                                                 softmax_scale, op)
    out, _, _, _ = _attend(q, k, v, cos, sin, off, interleaved, off, fl, fb, scale)
    return out.to(q.dtype).contiguous()


def _casts_qkv_under_autocast(fn):
    """``fn(q, k, v, ...)`` with q, k, v first cast to the autocast dtype of q's device and
    autocast off inside, as autocast treats SDPA's q, k, v (so q / k from an fp32 norm and v from
    a bf16 projection mix as they do with SDPA); unchanged outside autocast."""
    @functools.wraps(fn)
    def call(q, k, v, *args, **kwargs):
        ac = autocast_dtype(q)
        if ac is None:
            return fn(q, k, v, *args, **kwargs)
        q, k, v = cast_floating(ac, q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, k, v, *args, **kwargs)
    return call


def _no_kernel_fallback(backend: Optional[str], q: Tensor, tensors) -> bool:
    """Whether ``reference`` was picked because no kernel takes this call (``auto`` on a GPU
    without the Triton kernels, such as a T4 / V100; no compiled extension on CPU; a head_dim
    beyond the kernel's limit), not because it was asked for or because an autodiff transform
    needs it (then the reference, which every transform follows exactly): such calls run
    :func:`rope3d_attention_sdpa` instead of materialising the fp32 ``[B, H, S, S]`` scores.
    fp64 keeps the reference (fp64 math)."""
    requested = current_backend() if backend is None else backend
    return (requested != "reference" and q.dtype != torch.float64 and not forward_ad_active()
            and autodiff_transform(tensors) is None)


def _rotate_sdpa(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale):
    """:func:`rope3d_attention_sdpa` on checked arguments (canonical ``[L, D/2]`` tables)."""
    if cos is not None and (cos.requires_grad or sin.requires_grad):
        qr = _rope_torch(q, cos, sin, rope_offset, interleaved)  # differentiable in the tables
        kr = _rope_torch(k, cos, sin, rope_offset, interleaved)
    elif cos is not None:  # the RoPE kernel of this device (apply_rope's own auto choice)
        qr = apply_rope(q, cos, sin, interleaved=interleaved, offset=rope_offset, backend="auto")
        kr = apply_rope(k, cos, sin, interleaved=interleaved, offset=rope_offset, backend="auto")
    else:
        qr, kr = q, k
    qh, kh, vh = qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2)
    mask = None
    if fc_block:
        pieces = _frame_block_pieces(q.shape[1], fc_start, fc_len, fc_block)
        if pieces is not None:
            return _block_sdpa(qh, kh, vh, pieces, fc_start + fc_len, scale)
        mask = frame_causal_mask(q.shape[1], fc_start, fc_len, fc_block, q.device)
    out = _sdpa(qh, kh, vh, mask, scale)
    return out.transpose(1, 2).contiguous()  # (flash / memory-efficient: already [B, S, H, D])


# Frame-causal rotation + SDPA: up to this many frame blocks run one unmasked SDPA call each;
# more (blocks of a few tokens) take one call with the S x S mask.
_SDPA_MAX_BLOCK_CALLS = 128


def _frame_block_pieces(S, fc_start, fc_len, fc_block):
    """The unmasked SDPA calls of the frame-causal rule, ``[(q0, q1, n_keys), ...]``: queries
    ``q0 .. q1 - 1`` attend to the first ``n_keys`` keys of the order ``[text suffix, text
    prefix, video]`` (where every query's visible keys are a prefix: text queries see the
    ``S - fc_len`` text keys, block ``j`` the text and blocks ``0 .. j``). ``None`` where there
    are more than ``_SDPA_MAX_BLOCK_CALLS`` blocks, or while compiling (a loop over the sizes
    would pin them: a recompile per video length under dynamic shapes): then one call with the
    mask."""
    if torch.compiler.is_compiling() or not all(type(x) is int
                                                for x in (S, fc_start, fc_len, fc_block)):
        return None
    if S == 0:  # (nothing to attend: the masked call returns the empty output)
        return None
    if -(-fc_len // fc_block) > _SDPA_MAX_BLOCK_CALLS:
        return None
    v1 = fc_start + fc_len
    text = S - fc_len
    pieces = [(0, fc_start, text)] if fc_start else []
    pieces += [(a, min(a + fc_block, v1), S - v1 + min(a + fc_block, v1))
               for a in range(fc_start, v1, fc_block)]
    return pieces + ([(v1, S, text)] if v1 < S else [])


def _block_sdpa(qh, kh, vh, pieces, v1, scale):
    """Frame-causal attention as unmasked SDPA calls (``pieces``: :func:`_frame_block_pieces`) on
    ``[B, H, S, D]`` q / k / v, video range ending at ``v1``; returns ``[B, S, H, D]``
    contiguous. No ``S x S`` mask; a query's call holds only the keys it may see, so SDPA's
    flash kernels run, masked keys cost nothing and its backward sends them nothing (a NaN
    in the incoming gradient included). With a text suffix, k / v are copied once into that
    key order."""
    if v1 < kh.shape[2]:
        kh, vh = (torch.cat([t[:, :, v1:], t[:, :, :v1]], dim=2) for t in (kh, vh))
    outs = [_sdpa(qh[:, :, a:b], kh[:, :, :n], vh[:, :, :n], None, scale).transpose(1, 2)
            for a, b, n in pieces]
    return torch.cat(outs, dim=1).contiguous()  # (a no-op but where D = 1 leaves it ambiguous)


def _math_sdpa(q, k, v, mask, scale):
    """Softmax attention in plain PyTorch ops (fp32 math; twice differentiable), ``[B, H, S, D]``."""
    z = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(z, dim=-1), v.float()).to(q.dtype)


class _SDPATwice(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` whose backward is differentiable again. Its forward and
    an ordinary backward are SDPA's own (the fused kernel and its fused backward, through the
    autograd graph the forward records on detached views of the inputs, released once that
    backward has run); a backward with grad mode on (``create_graph=True``: gradient penalties,
    Hessian-vector products) returns the vector-Jacobian product of :func:`_math_sdpa` as a
    graph instead, since SDPA's fused backward has no derivative of its own.

    Memory is SDPA's (q, k, v are saved here too, but those are the tensors SDPA's graph saves
    views of: no second copy on the device; ``saved_tensors_hooks`` see them twice). A second
    ordinary backward through a retained graph recomputes SDPA's forward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        ctx.inner = _SDPATwice._record(q, k, v, mask, scale)
        ctx.mask, ctx.scale = mask, scale
        ctx.save_for_backward(q, k, v)
        return ctx.inner[0].detach()

    @staticmethod
    def _record(q, k, v, mask, scale):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale), leaves

    @staticmethod
    def backward(ctx, dout):
        needs = ctx.needs_input_grad[:3]
        q, k, v = ctx.saved_tensors
        if torch.is_grad_enabled():
            ctx.inner = None  # (not needed here; a later ordinary backward recomputes it)
            grads = differentiable_vjp(lambda q, k, v: _math_sdpa(q, k, v, ctx.mask, ctx.scale),
                                       (q, k, v), needs, (dout,))
            return (*grads, None, None)
        out, leaves = ctx.inner if ctx.inner is not None else \
            _SDPATwice._record(q, k, v, ctx.mask, ctx.scale)
        ctx.inner = None  # SDPA's saved tensors go now, as with plain SDPA
        got = iter(torch.autograd.grad(out, [t for t, n in zip(leaves, needs) if n], dout))
        return (*(next(got) if n else None for n in needs), None, None)


def _has_nonfinite(q: Tensor, k: Tensor) -> bool:
    """Whether CPU ``q`` / ``k`` hold a NaN / inf: two fp32 sums, one read of each (a CPU tensor:
    no device sync). ATen's CPU flash kernels return zeros for such a query's row where the
    reference and every kernel give NaN, hiding an overflow."""
    return not bool(torch.isfinite(q.sum(dtype=torch.float32) + k.sum(dtype=torch.float32)))


def _nonfinite_on_cpu(q: Tensor, k: Tensor) -> bool:
    """:func:`_has_nonfinite` for eager CPU calls (not while compiling or under a ``torch.func``
    transform, where the test would be data-dependent control flow)."""
    return (q.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None and _has_nonfinite(q, k))


def _sdpa(q, k, v, mask, scale):
    """SDPA (``[B, H, S, D]``) with a second derivative where autograd records it eagerly
    (:class:`_SDPATwice`); plain SDPA under ``torch.compile``, ``torch.func`` transforms and
    forward AD (which the Function does not follow) or when nothing requires grad. On the CPU,
    a NaN / inf in q or k takes :func:`_math_sdpa` (NaN rows, as the reference gives)."""
    if _nonfinite_on_cpu(q, k):
        return _math_sdpa(q, k, v, mask, scale)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            and not torch.compiler.is_compiling() and not forward_ad_active()
            and torch._C._functorch.peek_interpreter_stack() is None):
        return _SDPATwice.apply(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@_casts_qkv_under_autocast
def rope3d_attention_sdpa(q, k, v, cos=None, sin=None, *, rope_offset=0, interleaved=True,
                          frame_causal=False, tokens_per_frame=None, frames_per_block=1,
                          softmax_scale=None):
    """Unfused RoPE-3D attention: q / k rotated by :func:`~vidgen_kernels.apply_rope` (its
    kernel for the device), then ``torch.nn.functional.scaled_dot_product_attention``. Same
    signature and result as :func:`rope3d_attention` (the diffusers way of computing it). With
    ``frame_causal``, one unmasked SDPA call per frame block over the keys it may see (the
    text queries one more; with a text suffix, k / v are first copied once into the order
    suffix, prefix, video, so that those keys are a prefix): no ``S x S`` mask, about half the
    work of a masked call, and SDPA's flash kernels apply. Beyond 128 blocks and under
    ``torch.compile`` (where a loop over the blocks would recompile for every video length),
    one call with the rule as a boolean ``[S, S]`` ``attn_mask``.

    This is what ``rope3d_attention`` runs under ``auto`` where no kernel takes the call (a GPU
    below compute capability 8.0 such as a T4 / V100, a head_dim beyond the kernels' limit, a CPU
    without the compiled extension): SDPA's flash / memory-efficient kernels keep memory linear in
    S, where the reference materialises the fp32 scores (35 GiB at CogVideoX-2B's 17,776
    tokens). It costs two rotated copies of q / k and SDPA's backward (which saves them); on
    CPU, ATen's flash kernel (fp32 gradients somewhat less accurate than the ``cpu`` kernel's
    with peaked softmaxes, see the module docstring). Tables that require grad are rotated in
    PyTorch, so their gradients flow. With the mask (more than 128 frame blocks, or under
    ``torch.compile``), a NaN in the incoming gradient of a query also reaches
    the keys it cannot see (SDPA's backward multiplies their zero probabilities by it; the
    kernels, the reference and the per-block calls send nothing there), and SDPA turns the
    boolean mask into an additive one in q's dtype (``S^2`` elements). SDPA's fused backward has no
    derivative of its own, so a backward with ``create_graph=True`` (gradient penalties) takes
    the plain softmax-attention formula instead (:class:`_SDPATwice`; it materialises the fp32
    ``[B, H, S, S]`` scores, as the reference does); an ordinary backward is SDPA's. Under
    ``torch.compile`` and ``torch.func`` transforms SDPA runs as it is (no second derivative).
    Under ``torch.autocast`` q, k and v are cast as :func:`rope3d_attention` casts them.
    """
    op = "rope3d_attention_sdpa"
    cos, sin, off, fl, fb, scale = _check_inputs(q, k, v, cos, sin, rope_offset, interleaved,
                                                 frame_causal, tokens_per_frame, frames_per_block,
                                                 softmax_scale, op)
    return _rotate_sdpa(q, k, v, cos, sin, off, bool(interleaved), off, fl, fb, scale)


def kernel_fwd_torch(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                     scale):
    """The forward contract in PyTorch (the oracle the kernels are tested against)."""
    out, lse, _, _ = _attend(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len,
                             fc_block, scale)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def kernel_bwd_torch(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start,
                     fc_len, fc_block, scale):
    """The backward contract in PyTorch."""
    qr = _rope_torch(q, cos, sin, rope_offset, interleaved)
    kr = _rope_torch(k, cos, sin, rope_offset, interleaved)
    qh, kh, vh = (t.float().transpose(1, 2) for t in (qr, kr, v))
    do, o = dout.float().transpose(1, 2), out.float().transpose(1, 2)
    z = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    p = torch.exp(z - lse.transpose(1, 2)[..., None])
    allowed = None
    if fc_block:
        allowed = frame_causal_mask(q.shape[1], fc_start, fc_len, fc_block, q.device)
        p = p.masked_fill(~allowed, 0.0)
    delta = (do * o).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vh.transpose(-1, -2)) - delta)
    if allowed is not None:  # masked entries send no gradient, even a NaN one
        ds = ds.masked_fill(~allowed, 0.0)
    dq = (torch.matmul(ds, kh) * scale).transpose(1, 2)
    dk = (torch.matmul(ds.transpose(-1, -2), qh) * scale).transpose(1, 2)
    if cos is not None:
        dq = _rope_torch(dq, cos, -sin, rope_offset, interleaved)
        dk = _rope_torch(dk, cos, -sin, rope_offset, interleaved)
    return tuple(t.to(q.dtype).contiguous() for t in (dq, dk, dv.transpose(1, 2)))


# Query rows per chunk of kernel_jvp_torch: about this many fp32 score elements per chunk
_JVP_CHUNK_ELEMS = 1 << 22


def kernel_jvp_torch(q, k, v, dq, dk, dv, cos, sin, rope_offset, interleaved, fc_start, fc_len,
                     fc_block, scale, *, chunk_rows=None):
    """The forward-mode contract in PyTorch: the tangent of ``out`` (``[B, Sq, H, D]``
    contiguous, q's dtype) along the tangents ``dq, dk, dv`` of q, k, v (any strides; a
    zero tangent may be a stride-0 expanded zero). The tables are constants.

    Flash-style, one block of ``chunk_rows`` queries at a time (default: ~4M score elements per
    block), so memory is ``O(rows x Sk)``, not the ``O(Sq x Sk)`` of differentiating the
    reference: with ``z = scale <qr, kr>``, ``dz = scale (<dqr, kr> + <qr, dkr>)`` (the rotation
    is linear: ``dqr = rot(dq)``), ``p = softmax(z)`` and ``mu = sum_j p dz``,
    ``dout = (p (dz - mu)) v + p dv``. Differentiable PyTorch ops (fp32 math, fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    def heads(*xs, rotate_it):  # [B, H, S, D] (the last dims of xs joined) in fp32 / fp64
        xs = [_rope_torch(x, cos, sin, rope_offset, interleaved) if rotate_it else x for x in xs]
        return torch.cat([x.to(acc) for x in xs], -1).transpose(1, 2).contiguous()
    # the scores' tangent in one product: [q | dq] . [dk | k] = <q, dk> + <dq, k> (rotation and
    # scale commute with the sums); the scores from the q half of [q | dq]
    qq, kh, kd = heads(q, dq, rotate_it=True), heads(k, rotate_it=True), \
        heads(dk, k, rotate_it=True)
    vh, dvh = heads(v, rotate_it=False), heads(dv, rotate_it=False)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    rows = chunk_rows or max(1, _JVP_CHUNK_ELEMS // max(1, B * H * Sk))
    kt, kdt = kh.transpose(-1, -2), kd.transpose(-1, -2)
    dout = vh.new_empty((B, H, Sq, D))
    for r0 in range(0, Sq, rows):
        r = slice(r0, min(r0 + rows, Sq))
        z = torch.matmul(qq[:, :, r, :D], kt).mul_(scale)
        dz = torch.matmul(qq[:, :, r], kdt).mul_(scale)
        if fc_block:
            allowed = frame_causal_mask(Sq, fc_start, fc_len, fc_block, q.device, rows=r)
            z.masked_fill_(~allowed, float("-inf"))
        p = torch.softmax(z, dim=-1)
        pdz = p * dz
        pdz.addcmul_(p, pdz.sum(-1, keepdim=True), value=-1.0)  # p (dz - mu)
        dout[:, :, r] = torch.matmul(pdz, vh) + torch.matmul(p, dvh)
    return dout.transpose(1, 2).to(q.dtype).contiguous()


# ---- cpu backend: rotation, then ATen's flash-attention CPU kernel -----------------------------
def _rope_cpu(x: Tensor, cos, sin, offset: int, interleaved: bool, conj: bool = False,
              heads_major: bool = False) -> Tensor:
    """Rotated copy of ``x [B, S, H, D]`` by the C++ RoPE kernel (``conj``: by the negative
    angle). ``heads_major``: stored as a ``[B, H, S, D]`` buffer and returned as that ``[B, H, S,
    D]`` tensor (the layout ATen's CPU flash kernel reads fastest, ~6 % at S = 2k), else
    ``[B, S, H, D]`` contiguous. Without tables: ``x`` itself (no copy)."""
    if cos is None:
        return x.transpose(1, 2) if heads_major else x
    B, S, H, D = x.shape
    buf = torch.empty((B, H, S, D) if heads_major else (B, S, H, D), dtype=x.dtype, device=x.device)
    _rope_kernel("cpu")(x, cos, sin, buf.transpose(1, 2) if heads_major else buf, offset,
                        interleaved, conj)
    return buf


def _strided_last(*ts: Tensor) -> bool:
    """True if a tensor has a non-unit last stride: ATen's CPU flash kernel silently reads such
    tensors wrongly, so they go to the C++ kernel, which reads any strides in place."""
    return any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in ts)


def _cpp_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale):
    """The C++ kernel (csrc/attention_cpu.cpp): rotation on load, masked key ranges skipped."""
    B, Sq, H, D = q.shape
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Sq, H), dtype=torch.float32, device=q.device)
    _ext.C.rope3d_attn_fwd_cpu(q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start,
                               fc_len, fc_block, scale)
    return out, lse


def _cpp_bwd(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len,
             fc_block, scale):
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _ext.C.rope3d_attn_bwd_cpu(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, rope_offset,
                               interleaved, fc_start, fc_len, fc_block, scale)
    return dq, dk, dv


def kernel_fwd_cpu(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale):
    """Training forward (and every masked, strided or fp16 / bf16 one): the C++ kernel, whose
    out and lse the backward needs exactly. (With ATen's flash forward, lse is a few ulp of
    the scores' magnitude off, and with peaked softmaxes at head_dim 80 .. 160 the gradients
    come out at 3-8x the fp32 reference's error.) fwd + bwd costs what ATen's does."""
    return _cpp_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                    scale)


def kernel_fwd_cpu_infer(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len,
                         fc_block, scale):
    """Inference forward (no input requires grad): rotation by the C++ RoPE kernel, then
    ATen's CPU flash forward, 6-9 % faster than the C++ kernel at S = 1040 and within the 2x
    rule for out; the C++ kernel for a mask, a non-unit last stride (which ATen reads wrongly),
    fp16 / bf16 (ATen's reduced-precision kernel turns a row with an inf score into zeros
    instead of NaN, hiding an overflow) and a NaN / inf in the rotated q or k (its fp32 kernel
    returns zeros for such a query's row: found by two sums, one read of q and k)."""
    if fc_block or q.dtype != torch.float32 or _strided_last(q, k, v):
        return _cpp_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                        scale)
    qr = _rope_cpu(q, cos, sin, rope_offset, interleaved, heads_major=True)
    kr = _rope_cpu(k, cos, sin, rope_offset, interleaved, heads_major=True)
    if _has_nonfinite(qr, kr):
        return _cpp_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                        scale)
    o, l_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qr, kr, v.transpose(1, 2), 0.0, False, scale=scale)
    # ATen allocates out as [B, S, H, D] and logsumexp as [B, S, H] storage: transposes are free
    return o.transpose(1, 2).contiguous(), l_.transpose(1, 2).contiguous()


def kernel_bwd_cpu(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len,
                   fc_block, scale):
    """The C++ kernel (0.9-1.0x the time of ATen's CPU flash backward at S = 1040 .. 2064, D = 64
    / 128, and within the 2x rule where ATen's is not)."""
    return _cpp_bwd(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len,
                    fc_block, scale)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _kernels(backend: str):
    if backend == "cpu":
        return kernel_fwd_cpu, kernel_bwd_cpu
    if backend == "cpu_infer":  # the cpu backend's forward when nothing requires grad
        return kernel_fwd_cpu_infer, kernel_bwd_cpu
    if backend == "triton":
        from ..triton_kernels import rope3d_attention as tk
        return tk.rope3d_attn_fwd, tk.rope3d_attn_bwd
    if backend == "torch":  # the contract oracle; tests of the op plumbing
        return kernel_fwd_torch, kernel_bwd_torch
    raise ValueError(f"unknown kernel backend {backend!r}")


def _rope3d_attn_fwd_impl(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor],
                          sin: Optional[Tensor], rope_offset: int, interleaved: bool,
                          fc_start: int, fc_len: int, fc_block: int, scale: float,
                          backend: str) -> tuple[Tensor, Tensor]:
    B, Sq, H, D = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        out = torch.zeros((B, Sq, H, D), dtype=q.dtype, device=q.device)
        lse = torch.full((B, Sq, H), float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse
    fwd, _ = _kernels(backend)
    fc_block = min(fc_block, max(fc_len, 1)) if fc_block else 0  # (concrete here: see _check_inputs)
    return fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale)


_rope3d_attn_fwd = torch.library.custom_op("vidgen_kernels::rope3d_attn_fwd",
                                           mutates_args=())(_rope3d_attn_fwd_impl)


@_rope3d_attn_fwd.register_fake
def _(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale, backend):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, Sq, H), dtype=torch.float32)


def _rope3d_attn_bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor],
                          sin: Optional[Tensor], out: Tensor, lse: Tensor, rope_offset: int,
                          interleaved: bool, fc_start: int, fc_len: int, fc_block: int,
                          scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.numel() == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
                torch.zeros(k.shape, dtype=k.dtype, device=k.device),
                torch.zeros(v.shape, dtype=v.dtype, device=v.device))
    _, bwd = _kernels(backend)
    fc_block = min(fc_block, max(fc_len, 1)) if fc_block else 0  # (concrete here: see _check_inputs)
    return bwd(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len,
               fc_block, scale)


_rope3d_attn_bwd = torch.library.custom_op("vidgen_kernels::rope3d_attn_bwd",
                                           mutates_args=())(_rope3d_attn_bwd_impl)
_rope3d_attn_bwd_call = eager_op(_rope3d_attn_bwd, _rope3d_attn_bwd_impl)


@_rope3d_attn_bwd.register_fake
def _(dout, q, k, v, cos, sin, out, lse, rope_offset, interleaved, fc_start, fc_len, fc_block,
      scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, out, lse)
    ctx.args = tuple(args)
    ctx.set_materialize_grads(False)  # no zero gradient is made for lse (an output for backward)


def _backward(ctx, dout, _dlse):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    if dout is None:
        return (None,) * 12
    off, interleaved, fc_start, fc_len, fc_block, scale, _ = ctx.args
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        grads = differentiable_vjp(
            lambda q, k, v, cos, sin: _attend(q, k, v, cos, sin, off, interleaved, fc_start,
                                              fc_len, fc_block, scale)[0].to(q.dtype),
            (q, k, v, cos, sin), ctx.needs_input_grad[:5], (dout,))
        return grads + (None,) * 7
    dq, dk, dv = _rope3d_attn_bwd_call(dout, q, k, v, cos, sin, out, lse, *ctx.args)
    dcos = dsin = None
    if cos is not None and any(ctx.needs_input_grad[3:5]):  # tables that require grad
        qc, qs = table_grads(q, dq, cos, sin, interleaved, 1, off)
        kc, ks = table_grads(k, dk, cos, sin, interleaved, 1, off)
        dcos, dsin = (qc + kc).to(cos.dtype), (qs + ks).to(sin.dtype)
    return (dq, dk, dv, dcos, dsin) + (None,) * 7


_rope3d_attn_fwd_call = eager_op(_rope3d_attn_fwd, _rope3d_attn_fwd_impl, _setup_context,
                                 _backward)


# ---- forward-mode AD: the kernels' forward / backward plus a flash-style tangent ----------------
def _jvp_kernel(backend: str):
    if backend == "triton":
        from ..triton_kernels import rope3d_attention as tk
        return tk.rope3d_attn_jvp
    return kernel_jvp_torch  # cpu and the contract oracle: chunked PyTorch


class _AttentionTangent(torch.autograd.Function):
    """The tangent of the attention output from :func:`_jvp_kernel` (inputs: q, k, v, dq, dk,
    dv, then the contract's constants and the backend). Its backward (a gradient *through the
    tangent*, which consistency-model / MeanFlow recipes stop) recomputes the tangent with
    :func:`kernel_jvp_torch` and differentiates that: exact, memory ``O(Sq x Sk)`` then."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, cos, sin, *args):
        *contract, backend = args
        if q.numel() == 0 or k.shape[1] == 0:
            return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        return _jvp_kernel(backend)(q, k, v, dq, dk, dv, cos, sin, *contract)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:8])
        ctx.args = tuple(inputs[8:-1])

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]

        def tangent(q, k, v, dq, dk, dv):
            return kernel_jvp_torch(q, k, v, dq, dk, dv, *saved[6:], *ctx.args)
        grads = recomputed_vjp(tangent, saved[:6], needs, (g,))
        return (*grads,) + (None,) * (len(ctx.args) + 3)


def _zero_tangent(t: Tensor, x: Tensor) -> Tensor:
    return t if t is not None else x.new_zeros(()).expand(x.shape)  # stride 0: no memory


class _Rope3dAttnForwardAD(torch.autograd.Function):
    """``(out, lse)`` of the kernels (same inputs as the custom op ``rope3d_attn_fwd``) with a
    forward-mode derivative: under ``torch.func.jvp`` or a ``torch.autograd.forward_ad`` dual
    level the tangent is computed flash-style (:class:`_AttentionTangent`) instead of
    differentiating the reference's materialised softmax; reverse mode uses the kernels'
    backward, as the custom op does."""

    @staticmethod
    def forward(q, k, v, cos, sin, *args):
        return _rope3d_attn_fwd_impl(q, k, v, cos, sin, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:5])
        ctx.mark_non_differentiable(output[1])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dcos, dsin, *_):
        q, k, v, cos, sin = ctx.saved_tensors[:5]
        off, interleaved, fc_start, fc_len, fc_block, scale, backend = ctx.args
        if dcos is not None or dsin is not None:  # a table with a tangent: differentiate _attend
            def f(q, k, v, cos, sin):
                return _attend(q, k, v, cos, sin, off, interleaved, fc_start, fc_len, fc_block,
                               scale)[0].to(q.dtype)
            prim = (q, k, v, cos, sin)
            tans = tuple(_zero_tangent(t, x) for t, x in zip((dq, dk, dv, dcos, dsin), prim))
            return torch.func.jvp(f, prim, tans)[1].contiguous(), None
        tangent = _AttentionTangent.apply(q, k, v, _zero_tangent(dq, q), _zero_tangent(dk, k),
                                          _zero_tangent(dv, v), cos, sin, *ctx.args)
        return tangent, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
@_casts_qkv_under_autocast
def rope3d_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor] = None,
                     sin: Optional[Tensor] = None, *, rope_offset: int = 0,
                     interleaved: bool = True, frame_causal: bool = False,
                     tokens_per_frame: Optional[int] = None, frames_per_block: int = 1,
                     softmax_scale: Optional[float] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Attention over ``[B, S, H, D]`` tokens with RoPE fused into the q/k loads.

    Args:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H, D]``; any strides (e.g. the slices of a fused
            qkv projection, or ``[B, H, S, D]`` tensors transposed back), read in place.
        cos, sin: ``None`` (plain attention; ``S_k`` may differ from ``S_q``) or the RoPE table
            of the video tokens, ``[L, D/2]`` or diffusers' ``[L, D]`` repeated layout, any float
            dtype; L <= S - rope_offset.
        rope_offset: first rotated token (= text length for text-first CogVideoX, 0 for
            text-last HunyuanVideo). Tokens outside ``[rope_offset, rope_offset + L)`` are not
            rotated.
        interleaved: RoPE pairs ``(2i, 2i+1)`` (CogVideoX / Wan / Hunyuan) or ``(i, i + D/2)``.
        frame_causal: block-causal mask over frames of the video range (module docstring: video
            tokens see all text and their own and earlier blocks; text sees text only).
        tokens_per_frame, frames_per_block: the frame / block structure for ``frame_causal``;
            not read without it (so ``frame_causal=cfg.causal, tokens_per_frame=h * w`` works
            for both settings).
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``None`` (current default), ``"reference"``, ``"cpu"``, ``"triton"``. Where
            ``auto`` finds no kernel for the call, it runs :func:`rope3d_attention_sdpa`.
    Returns:
        ``[B, S_q, H, D]`` contiguous, q's dtype. Under ``torch.autocast`` for q's device, q, k
        and v are first cast to the autocast dtype, as SDPA's are (so q / k from an fp32 norm
        and v from a bf16 projection mix as they do with SDPA). Gradients reach q, k, v and,
        where they require grad, cos / sin (from the kernels' dq / dk, in PyTorch).
    """
    op = "rope3d_attention"
    cos, sin, off, fl, fb, scale = _check_inputs(q, k, v, cos, sin, rope_offset, interleaved,
                                                 frame_causal, tokens_per_frame, frames_per_block,
                                                 softmax_scale, op)
    name = resolve(backend, q.device, q.dtype, SUPPORTED_DTYPES, op, (q, k, v, cos, sin),
                   forward_ad=True)
    lim = MAX_D.get(name)
    if lim is not None and q.shape[-1] > lim:
        if may_fall_back(backend):
            name = "reference"
        else:
            raise ValueError(f"{op}: backend {name!r} supports head_dim <= {lim}, got {q.shape[-1]}")
    if name == "reference":
        if _no_kernel_fallback(backend, q, (q, k, v, cos, sin)):
            return _rotate_sdpa(q, k, v, cos, sin, off, bool(interleaved), off, fl, fb,
                                scale)
        out, _, _, _ = _attend(q, k, v, cos, sin, off, interleaved, off, fl, fb, scale)
        return out.to(q.dtype).contiguous()
    if forward_ad_active():  # (resolve let the kernels run: jvp / forward_ad alone)
        args = (q, k, v, cos, sin, off, bool(interleaved), off, fl, fb, scale, name)
        return _Rope3dAttnForwardAD.apply(*args)[0]
    if name == "cpu" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, cos, sin))):
        name = "cpu_infer"  # no backward will run: ATen's flash forward where it applies
    out, _ = _rope3d_attn_fwd_call(q, k, v, cos, sin, off, bool(interleaved), off, fl, fb, scale,
                                   name)
    return out
