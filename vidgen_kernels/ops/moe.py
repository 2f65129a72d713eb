"""Dropless grouped-GEMM Mixture-of-Experts FFN: routing, dispatch, expert compute, combine.

Public: ``moe_ffn`` (the pipeline, backends ``cpu`` / ``triton`` / ``reference``),
``moe_ffn_reference`` (the seed's per-expert loop, kept as the readable definition) and
``MoEOutput``.

Definition (every backend computes this)
----------------------------------------
Shapes: ``x`` ``[..., C]`` is flattened to ``N`` tokens ``[N, C]``; ``router_logits`` ``[N, E]``;
``w1`` ``[E, C, F]`` (``[E, C, 2F]`` for the gated activations), ``b1`` ``[E, F]`` (``[E, 2F]``),
``w2`` ``[E, F, C]``, ``b2`` ``[E, C]``; ``k = top_k``; ``P = N * k`` (token, slot) pairs.

* Routing: ``p = softmax(logits.float())`` over E. The k experts of a token are its k largest
  logits (equivalently probabilities), in decreasing order; **ties go to the lowest expert
  index** (deterministic: a stable descending sort of the logits; selecting on the logits rather
  than the rounded probabilities makes every backend pick the same experts). The weights are the
  selected probabilities, divided by their sum when ``normalize_weights`` (the seed's router), in
  float32.
* ``expert_index`` ``[N]`` (integer) replaces the router: token n goes to expert
  ``expert_index[n]`` with weight 1 (``top_k`` is then 1; CogVideoX-style modality experts).
* Expert e on a row ``h``: ``act(h @ w1[e] + b1[e]) @ w2[e] + b2[e]``. Activations:
  ``"gelu"`` (tanh approximation), ``"gelu_exact"`` (erf), ``"silu"``, and the gated
  ``"swiglu"`` = ``silu(a) * b``, ``"geglu"`` = ``gelu_tanh(a) * b``, ``"geglu_exact"`` =
  ``gelu_erf(a) * b`` with ``a = h @ w1[e][:, :F] + b1[e][:F]`` and ``b`` the other half.
* ``out[n] = sum_j weight[n, j] * expert_{idx[n, j]}(x[n])`` (fp32 sum, rounded to x's dtype),
  returned with x's shape.
* ``aux_loss = E * sum_e f_e * P_e`` (Switch Transformer) with ``f_e = count_e / (N * k)`` (the
  fraction of the (token, slot) assignments that go to e; sums to 1, so the loss is 1 at perfect
  balance) and ``P_e = mean_n p[n, e]``; ``z_loss = mean_n logsumexp(logits[n])^2``. Both float32
  scalars with gradients to the logits (``f`` is a count: no gradient). Under ``expert_index`` the
  counts are those of the given assignment, and both losses are 0 when ``router_logits`` is None.
* ``tokens_per_expert``: ``[E]`` int64 counts of assignments.

Pipeline of the kernel backends (no per-expert Python loop, no padding, no host synchronisation:
every size below is static, N*k rows):

1. ``moe_route``: softmax / top-k / renormalise -> ``weights`` fp32 ``[N, k]``, ``idx`` int64
   ``[N, k]`` (one fused kernel on ``cpu`` (C++) and ``cuda``; ``triton`` runs the PyTorch
   contract ``kernel_route_torch``: softmax, topk, sum, divide).
2. ``moe_sort``: stable sort of the P pairs by expert (within an expert, pairs keep the (token,
   slot) order): a C++ counting sort on ``cpu``; ``kernel_sort_torch`` (a stable
   ``torch.argsort`` of the expert ids, a scatter and an ``index_add_``; the same result) on
   ``triton`` and ``cuda`` -> ``order [P]`` (flat pair ``n*k + j`` at sorted row p), ``tok [P]``
   (its token), ``pos [N, k]`` (inverse: sorted row of pair (n, j)), ``counts [E]``,
   ``offs [E]`` (int64 cumulative ends: expert e owns rows ``offs[e-1] .. offs[e]``).
3. ``moe_experts``: permutation ``xs = x[tok]`` ``[P, C]``, grouped GEMM 1 with bias +
   activation in its epilogue, grouped GEMM 2 (+ bias) -> ``y [P, C]``.
4. ``moe_unpermute``: ``out[n] = sum_j weights[n, j] * y[pos[n, j]]`` (a gather per token, in
   slot order: deterministic, no atomics).

Backward: ``dy[p] = w(p) * dout[tok[p]]``, ``dweights[n, j] = <dout[n], y[pos[n, j]]>``; expert
backward ``dhid = dy @ w2[e]^T`` (grouped GEMM), ``dw2[e] = hid_e^T dy_e`` (grouped weight-grad
GEMM over the expert's permuted rows), ``db2[e] = sum dy_e``; ``dpre = act'(pre) * dhid``;
``dw1``, ``db1`` alike; ``dxs = dpre @ w1[e]^T``; ``dx[n] = sum_j dxs[pos[n, j]]``; the router
gradient flows from ``dweights`` through renormalisation and softmax, plus the aux / z losses.
Saved for backward: x ``[N, C]`` (not the k times larger ``xs``: backward gathers it again), the
pre-activation ``[P, F]`` (the hidden ``act(pre)`` is recomputed from it in an elementwise pass
rather than kept), y ``[P, C]`` (for the routing-weight gradient), the small index tensors.

Kernel contract (per backend; ``kernel_*_torch`` below is the contract in PyTorch)
-------------------------------------------------------------------------------
* ``route(logits [N, E] fp32 contiguous, top_k, normalize) -> (weights fp32 [N, k], idx int64)``
* ``sort(idx [N, k] int64, E) -> (order, tok, pos, counts, offs)`` as above.
* ``gather(src [M, C], rows int64 [P]) -> [P, C]`` contiguous.
* ``combine(y [P, C], pos [N, k], weights fp32 [N, k] or None) -> [N, C]`` in y's dtype.
* ``combine_wgrad(dout [N, C], y [P, C], pos) -> fp32 [N, k]``.
* ``gmm(a [P, K], w [E, K, M] any strides, offs, bias [E, M] any strides or None) -> [P, M]``
  (``a_e @ w[e] + bias[e]`` per segment; a transposed, sliced or expanded (stride 0) bias is
  read in place, as ``moe_ffn`` hands the user's b1 / b2 through unchanged).
* ``gmm_act(a, w, offs, bias [E, M] or None, activation) -> (pre [P, M], hid [P, M or M/2])``:
  ``pre = gmm + bias``, ``hid = act(pre)`` (rounded to a's dtype; fp32 math).
* ``gmm_wgrad(a [P, K], dy [P, M], offs) -> [E, K, M]`` (``a_e^T dy_e``, zero for empty e).
* ``act(pre [P, M], activation) -> hid`` and ``act_bwd(dhid, pre, activation, reuse_dhid) ->
  dpre [P, M]`` (backward's recomputed hidden and ``act'(pre) * dhid``; ``apply_act`` /
  ``act_backward`` below are the contract).

Forward-mode AD (``torch.func.jvp`` alone, or a ``torch.autograd.forward_ad`` dual level; eager):
the kernel pipeline runs, each stage as an ``autograd.Function`` with the custom op's backward
and a ``jvp`` on the same kernels (``moe_pipeline(forward_ad=True)``): the weights' tangent
``(dp[idx] - w sum dp[idx]) / s`` with ``dp = p (dl - <p, dl>)`` (PyTorch, ``[N, k]``);
``dpre = gmm(dx[tok], w1) + gmm(x[tok], dw1) + db1``, ``dhid = act'(pre) dpre`` (gated:
``f'(a) da b + f(a) db``), ``dy = gmm(dhid, w2) + gmm(act(pre), dw2) + db2``; ``dout =
combine(dy, w) + combine(y, dw)``. Inputs without a tangent cost nothing (a tangent on x alone:
two grouped GEMMs). A gradient *through* the tangent recomputes it with the PyTorch contract
and differentiates that. ``jacfwd``, nested and compiled jvp take the reference.

Backends: ``cpu`` (C++: route, sort, gather, combine, combine_wgrad, and the grouped GEMMs as
``at::mm`` / ``at::addmm`` (bias) calls per expert segment inside one C++ call; the tanh
GELU (plain and geglu, fp32) and its derivative as one vectorised C++ pass each, the other
activations with PyTorch's fused gelu / silu kernels),
``triton`` (grouped GEMM kernels with the bias + activation epilogue fused, and the
weight-gradient grouped GEMM; routing / sort / permutes in PyTorch device ops, no host sync),
``cuda`` (CUDA C++ routing, permutation and weighted un-permutation kernels, csrc/moe_cuda.cu,
with Triton's grouped GEMMs; compile-checked only: no GPU was available when it was written),
``reference`` (the seed's loop). ``auto`` picks ``cuda``, then ``triton`` on CUDA tensors and
``cpu`` on CPU tensors.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor
import torch.nn.functional as F

from ._checks import autocast_dtype, cast_floating, check_flags, got_int
from ._eager import differentiable_vjp, eager_op, recomputed_vjp
from ..backends import current_backend, forward_ad_active, resolve

__all__ = ["MoEOutput", "moe_ffn", "moe_ffn_reference", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_exact", "silu", "swiglu", "geglu", "geglu_exact")
GATED = ("swiglu", "geglu", "geglu_exact")
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# the cuda backend's routing / permute / combine are CUDA C++, its grouped GEMMs Triton's: it
# runs where both do (a build for sm_75 has CUDA kernels a T4 loads, and no Triton path there)
BACKEND_NEEDS = {"cuda": ("triton",)}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# expert_index dtypes: PyTorch's integer types with min / max / index kernels (not the
# uint16 / uint32 / uint64 "shell" dtypes, which have none)
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class MoEOutput(NamedTuple):
    """``out``: x's shape and dtype; ``aux_loss``, ``z_loss``: float32 scalars;
    ``tokens_per_expert``: int64 ``[E]``."""
    out: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor


# ----------------------------------------------------------------------------------------------
# activations (fp32 math) and their derivatives
# ----------------------------------------------------------------------------------------------
def _base_act(name: str) -> str:
    return {"swiglu": "silu", "geglu": "gelu", "geglu_exact": "gelu_exact"}.get(name, name)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f(z: Tensor, base: str) -> Tensor:
    """The activation with PyTorch's fused kernels (one pass, fp32 math inside)."""
    if base == "gelu":
        return F.gelu(z, approximate="tanh")
    if base == "gelu_exact":
        return F.gelu(z)
    return F.silu(z)


def _df_mul(g: Tensor, z: Tensor, base: str, out: Optional[Tensor] = None) -> Tensor:
    """``g * act'(z)`` with PyTorch's fused backward kernels (into ``out`` when given, which may
    be ``g`` itself: an elementwise kernel)."""
    if out is not None:
        if base == "silu":
            return torch.ops.aten.silu_backward.grad_input(g, z, grad_input=out)
        return torch.ops.aten.gelu_backward.grad_input(
            g, z, approximate="tanh" if base == "gelu" else "none", grad_input=out)
    if base == "gelu":
        return torch.ops.aten.gelu_backward(g, z, approximate="tanh")
    if base == "gelu_exact":
        return torch.ops.aten.gelu_backward(g, z)
    return torch.ops.aten.silu_backward(g, z)


def apply_act(pre: Tensor, activation: str) -> Tensor:
    """``[P, M]`` pre-activation -> hidden ``[P, M]`` (``[P, M/2]`` gated), pre's dtype, fp32
    (fp64) math, one rounding."""
    z = pre if pre.dtype in (torch.float32, torch.float64) else pre.float()
    base = _base_act(activation)
    if activation in GATED:
        F_ = pre.shape[-1] // 2
        h = _f(z[:, :F_], base) * z[:, F_:]
    else:
        h = _f(z, base)
    return h.to(pre.dtype)


def act_backward(dhid: Tensor, pre: Tensor, activation: str, reuse_dhid: bool = False) -> Tensor:
    """Gradient of :func:`apply_act` w.r.t. ``pre`` (pre's dtype). ``reuse_dhid``: the caller
    owns ``dhid`` and it may be overwritten with the result when the shapes and dtypes allow
    (plain activations in fp32 / fp64: no new ``[P, F]`` buffer)."""
    z = pre if pre.dtype in (torch.float32, torch.float64) else pre.float()
    base = _base_act(activation)
    if reuse_dhid and activation not in GATED and dhid.dtype == z.dtype == pre.dtype \
            and dhid.is_contiguous():
        return _df_mul(dhid, z, base, out=dhid)
    g = dhid.to(z.dtype)
    if activation in GATED:
        F_ = pre.shape[-1] // 2
        a, b = z[:, :F_], z[:, F_:]
        d = torch.cat([_df_mul(g * b, a, base), g * _f(a, base)], dim=-1)
    else:
        d = _df_mul(g, z, base)
    return d.to(pre.dtype)


def _gelu_tanh(z: Tensor) -> Tensor:
    """tanh-approximated GELU (``[..., M] -> [..., M]``)."""
    return torch.nn.functional.gelu(z, approximate="tanh")


def _gated_act(z: Tensor, base) -> Tensor:
    """``base(a) * b`` with ``a, b`` the two halves of ``z [..., 2F]`` -> ``[..., F]``."""
    a, b = z.chunk(2, dim=-1)
    return base(a) * b


def _act_module_fn(activation: str):
    """The seed's activation as a PyTorch function of the pre-activation (reference). Module
    level functions / ``functools.partial`` only (no lambda or closure): a module that stores it
    (``nn.MoEFFN``) can be pickled / ``torch.save``d."""
    base = {"gelu": _gelu_tanh, "gelu_exact": F.gelu, "silu": F.silu}[_base_act(activation)]
    if activation in GATED:
        return functools.partial(_gated_act, base=base)
    return base


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, router_logits, w1, w2, top_k, activation, b1, b2, expert_index,
                  normalize_weights, op):
    check_flags(op, normalize_weights=normalize_weights)
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., C] with C >= 1, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    N = x.numel() // C
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{op}: w1 must be [E, C, F] and w2 [E, F, C] (3-D), got w1 "
                         f"{tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    E = w1.shape[0]
    gated = activation in GATED
    F_ = w2.shape[1]
    want_w1 = (E, C, 2 * F_ if gated else F_)
    if E == 0 or F_ == 0:
        raise ValueError(f"{op}: need E >= 1 experts and F >= 1, got w1 {tuple(w1.shape)}, w2 "
                         f"{tuple(w2.shape)}")
    if tuple(w2.shape) != (E, F_, C):
        raise ValueError(f"{op}: w2 must be [E, F, C] = [{E}, F, {C}] (E from w1, C from x), got "
                         f"{tuple(w2.shape)}")
    if tuple(w1.shape) != want_w1:
        raise ValueError(f"{op}: w1 must be [E, C, {'2F' if gated else 'F'}] = {list(want_w1)} to "
                         f"chain with x (C={C}) and w2 {tuple(w2.shape)} for activation "
                         f"{activation!r}, got {tuple(w1.shape)}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    for name, t, shape in (("b1", b1, (E, w1.shape[2])), ("b2", b2, (E, C))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if router_logits is not None:
        if not isinstance(router_logits, Tensor):
            raise TypeError(f"{op}: router_logits must be a torch.Tensor, got "
                            f"{type(router_logits).__name__}")
        if router_logits.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: router_logits must be floating, got {router_logits.dtype}")
        if tuple(router_logits.shape) != (N, E):
            raise ValueError(f"{op}: router_logits must be [N, E] = [{N}, {E}] (one row per token "
                             f"of x {tuple(x.shape)}, one column per expert), got "
                             f"{tuple(router_logits.shape)}")
        if router_logits.device != x.device:
            raise ValueError(f"{op}: router_logits is on {router_logits.device} but x is on "
                             f"{x.device}")
    if expert_index is None:
        if router_logits is None:
            raise ValueError(f"{op}: router_logits is required unless expert_index is given")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise ValueError(f"{op}: top_k must be a Python int in [1, E={E}], got {got_int(top_k)}")
    else:
        if not isinstance(expert_index, Tensor) or expert_index.dtype not in INDEX_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in INDEX_DTYPES)
            raise TypeError(f"{op}: expert_index must be an integer tensor [N] of dtype {names}, "
                            f"got {getattr(expert_index, 'dtype', type(expert_index).__name__)}")
        if expert_index.numel() != N:
            raise ValueError(f"{op}: expert_index must have N={N} entries (one per token), got "
                             f"shape {tuple(expert_index.shape)}")
        if expert_index.device != x.device:
            raise ValueError(f"{op}: expert_index is on {expert_index.device} but x is on {x.device}")
        # value check (skipped on meta tensors, which have no values): on the host a
        # ValueError; on a GPU a device-side assert instead of a host sync in the forward (it
        # fails at a later launch and, like torch's own index checks, ends the CUDA context;
        # the kernels never read out of bounds); compiled, that assert on any device (a
        # RuntimeError on the host: the compiled reference loop dropped the tokens silently)
        if N > 0 and not expert_index.is_meta:
            if expert_index.device.type == "cuda" or torch.compiler.is_compiling():
                torch._assert_async(((expert_index >= 0) & (expert_index < E)).all(),
                                    f"{op}: expert_index values must be in [0, E={E})")
            else:
                lo, hi = int(expert_index.min()), int(expert_index.max())
                if lo < 0 or hi >= E:
                    raise ValueError(f"{op}: expert_index values must be in [0, E={E}), got "
                                     f"range [{lo}, {hi}]")
    return N, C, E, F_


# ----------------------------------------------------------------------------------------------
# losses (autograd PyTorch; cheap O(N*E))
# ----------------------------------------------------------------------------------------------
def _losses(logits: Optional[Tensor], counts: Tensor, P: int):
    if logits is None:
        z = torch.zeros((), dtype=torch.float32, device=counts.device)
        return z, z.clone()
    lf = logits.float()
    E = lf.shape[1]
    probs = torch.softmax(lf, dim=-1)
    f = counts.to(torch.float32) / P
    aux = E * (f * probs.mean(0)).sum()
    zl = torch.logsumexp(lf, dim=-1).pow(2).mean()
    return aux, zl


def _select(lf: Tensor, top_k: int):
    """Top-k by logits, ties to the lowest index (stable descending sort)."""
    _, idx = torch.sort(lf, dim=-1, descending=True, stable=True)
    return idx[:, :top_k]


# ----------------------------------------------------------------------------------------------
# reference: the seed's per-expert loop
# ----------------------------------------------------------------------------------------------
def moe_ffn_reference(x, router_logits, w1, w2, *, top_k=2, activation="gelu", b1=None, b2=None,
                      normalize_weights=True, expert_index=None) -> MoEOutput:
    """The seed design: route, then for every expert and slot gather its tokens with a boolean
    mask (a host sync on ``mask.any()``), run the expert, and add the weighted result. Plain
    PyTorch autograd; the readable definition the kernel backends are tested against."""
    op = "moe_ffn_reference"
    ac = autocast_dtype(x)
    if ac is not None:  # the experts are GEMMs: autocast's operand casts, then autocast off
        x, w1, w2, b1, b2 = cast_floating(ac, x, w1, w2, b1, b2)
        with torch.autocast(x.device.type, enabled=False):
            return moe_ffn_reference(x, router_logits, w1, w2, top_k=top_k,
                                     activation=activation, b1=b1, b2=b2,
                                     normalize_weights=normalize_weights,
                                     expert_index=expert_index)
    N, C, E, _ = _check_inputs(x, router_logits, w1, w2, top_k, activation, b1, b2,
                               expert_index, normalize_weights, op)
    if N == 0:
        return _empty_batch(x, router_logits, w1, w2, b1, b2, E)
    if x.is_meta:  # shapes only: the loop needs values (mask.any()), the custom ops' fakes not
        out, aux, zl, counts = moe_pipeline(x.reshape(N, C), router_logits, w1, w2, b1, b2, top_k,
                                            activation, normalize_weights, expert_index, "cpu",
                                            forward_ad=False)
        return MoEOutput(out.reshape(x.shape), aux, zl, counts)
    xf = x.reshape(N, C)
    if expert_index is not None:
        k = 1
        topi = expert_index.reshape(N, 1).long()
        topw = torch.ones(N, 1, dtype=torch.float32, device=x.device)
    else:
        k = top_k
        lf = router_logits.float()
        probs = torch.softmax(lf, dim=-1)
        topi = _select(lf, k)
        topw = probs.gather(1, topi)
        if normalize_weights:
            topw = topw / topw.sum(-1, keepdim=True)
    act = _act_module_fn(activation)
    out = torch.zeros(N, C, dtype=_acc(x.dtype), device=x.device)
    for e in range(E):
        for j in range(k):
            mask = topi[:, j] == e
            if not mask.any():
                continue
            h = xf[mask] @ w1[e]
            if b1 is not None:
                h = h + b1[e]
            y = act(h) @ w2[e]
            if b2 is not None:
                y = y + b2[e]
            out[mask] += topw[mask, j:j + 1].to(out.dtype) * y.to(out.dtype)
    counts = torch.bincount(topi.reshape(-1), minlength=E)
    aux, zl = _losses(router_logits, counts, N * k)
    return MoEOutput(out.to(x.dtype).reshape(x.shape), aux, zl, counts)


# ----------------------------------------------------------------------------------------------
# the kernel contract in PyTorch ("torch" kernels; also the triton backend's non-GEMM parts)
# ----------------------------------------------------------------------------------------------
def kernel_route_torch(logits: Tensor, top_k: int, normalize: bool):
    lf = logits.float()
    probs = torch.softmax(lf, dim=-1)
    idx = _select(lf, top_k)
    w = probs.gather(1, idx)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return w.contiguous(), idx.contiguous()


def kernel_sort_torch(idx: Tensor, E: int):
    N, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = torch.div(order, k, rounding_mode="floor")
    P = flat.numel()
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(P, device=idx.device))
    counts = torch.zeros(E, dtype=torch.int64, device=idx.device).index_add_(
        0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0)
    return order, tok, pos.view(N, k), counts, offs


def kernel_gather_torch(src: Tensor, rows: Tensor) -> Tensor:
    return src.index_select(0, rows)


def kernel_combine_torch(y: Tensor, pos: Tensor, w: Optional[Tensor]) -> Tensor:
    N, k = pos.shape
    g = y.index_select(0, pos.reshape(-1)).view(N, k, -1).to(_acc(y.dtype))
    if w is not None:
        g = g * w.to(g.dtype).unsqueeze(-1)
    return g.sum(1).to(y.dtype)


def kernel_combine_wgrad_torch(dout: Tensor, y: Tensor, pos: Tensor) -> Tensor:
    N, k = pos.shape
    g = y.index_select(0, pos.reshape(-1)).view(N, k, -1).to(_acc(y.dtype))
    return (g * dout.to(g.dtype).unsqueeze(1)).sum(-1).float()


def segment_ids(offs: Tensor, P: int) -> Tensor:
    """Expert of every sorted row ``[P]`` int64, from the cumulative ends (no host sync)."""
    return torch.searchsorted(offs, torch.arange(P, device=offs.device), right=True)


def _gmm_ok(a: Tensor, w: Tensor) -> bool:
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    s = a.element_size()
    ok_a = (a.stride(1) == 1 and (a.stride(0) * s) % 16 == 0) or \
        (a.stride(0) == 1 and (a.stride(1) * s) % 16 == 0)
    ok_w = (w.stride(2) == 1 and (w.stride(1) * s) % 16 == 0) or \
        (w.stride(1) == 1 and (w.stride(2) * s) % 16 == 0)
    return ok_a and ok_w and w.data_ptr() % 16 == 0 and a.data_ptr() % 16 == 0


def _pad_to(n: int, t: Tensor) -> int:
    """Zeros to append to a dimension of ``n`` elements of ``t``'s dtype for 16-byte rows."""
    m = 16 // t.element_size()
    return -n % m


def kernel_gmm_torch(a: Tensor, w: Tensor, offs: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``torch._grouped_mm`` for fp32/fp16/bf16: on ``a`` / ``w`` as they are where their
    strides are 16-byte multiples, else on zero-padded copies (``[P, K']`` and ``[E, K', M']``:
    the products of the padding are zeros, sliced off). fp64: a per-row batched product against
    the gathered expert matrices (``[P, K, M]``: small shapes only, as gradcheck uses)."""
    if a.shape[0] == 0:
        return a.new_zeros((0, w.shape[2]))
    if _gmm_ok(a, w):
        out = torch._grouped_mm(a, w, offs=offs.to(torch.int32))
    elif a.dtype in (torch.float32, torch.float16, torch.bfloat16):
        K, M = w.shape[1], w.shape[2]
        pk, pm = _pad_to(K, a), _pad_to(M, a)
        out = torch._grouped_mm(F.pad(a, (0, pk)), F.pad(w, (0, pm, 0, pk)),
                                offs=offs.to(torch.int32))[:, :M]
    else:
        seg = segment_ids(offs, a.shape[0]).clamp_(max=w.shape[0] - 1)
        out = torch.bmm(a.unsqueeze(1), w.index_select(0, seg)).squeeze(1)
    if bias is not None:
        out = out + bias.index_select(0, segment_ids(offs, a.shape[0]).clamp_(max=w.shape[0] - 1))
    return out


def kernel_gmm_act_torch(a, w, offs, bias, activation):
    pre = kernel_gmm_torch(a, w, offs, bias)
    return pre, apply_act(pre, activation)


def kernel_gmm_wgrad_torch(a: Tensor, dy: Tensor, offs: Tensor, E: int) -> Tensor:
    P = a.shape[0]
    acc = _acc(a.dtype)
    s = a.element_size()
    if a.dtype in (torch.float32, torch.float16, torch.bfloat16) and P > 0:
        K, M = a.shape[1], dy.shape[1]
        if all((d * s) % 16 == 0 for d in (P, K, M)):
            return torch._grouped_mm(a.t().contiguous(), dy.contiguous(), offs=offs.to(torch.int32))
        # 16-byte rows from zero padding: zero rows (after offs[-1], in no group) and columns
        pp, pk, pm = _pad_to(P, a), _pad_to(K, a), _pad_to(M, a)
        at = F.pad(a, (0, pk, 0, pp)).t().contiguous()
        return torch._grouped_mm(at, F.pad(dy, (0, pm, 0, pp)),
                                 offs=offs.to(torch.int32))[:, :K, :M]
    # outer products summed by expert (fp64: small shapes only, as gradcheck uses)
    seg = segment_ids(offs, P).clamp_(max=E - 1)
    outer = a.to(acc).unsqueeze(2) * dy.to(acc).unsqueeze(1)
    out = torch.zeros((E, a.shape[1], dy.shape[1]), dtype=acc, device=a.device)
    return out.index_add_(0, seg, outer).to(a.dtype)


def segment_sum(t: Tensor, offs: Tensor, E: int) -> Tensor:
    """``[E, M]``: sum of the rows of each expert segment (fp32 accumulation, t's dtype)."""
    seg = segment_ids(offs, t.shape[0]).clamp_(max=E - 1)
    out = torch.zeros((E, t.shape[1]), dtype=_acc(t.dtype), device=t.device)
    return out.index_add_(0, seg, t.to(out.dtype)).to(t.dtype)


class _TorchKernels:
    route = staticmethod(kernel_route_torch)
    sort = staticmethod(kernel_sort_torch)
    gather = staticmethod(kernel_gather_torch)
    combine = staticmethod(kernel_combine_torch)
    combine_wgrad = staticmethod(kernel_combine_wgrad_torch)
    gmm = staticmethod(kernel_gmm_torch)
    gmm_act = staticmethod(kernel_gmm_act_torch)
    gmm_wgrad = staticmethod(kernel_gmm_wgrad_torch)
    act = staticmethod(apply_act)
    act_bwd = staticmethod(act_backward)


class _CpuKernels(_TorchKernels):
    @staticmethod
    def _C():
        from .. import _ext
        return _ext.C

    @staticmethod
    def route(logits, top_k, normalize):
        return _CpuKernels._C().moe_route_cpu(logits.float().contiguous(), top_k, normalize)

    @staticmethod
    def sort(idx, E):
        order, tok, pos, counts, offs = _CpuKernels._C().moe_sort_cpu(idx.contiguous(), E)
        return order, tok, pos, counts, offs

    @staticmethod
    def gather(src, rows):
        return _CpuKernels._C().moe_gather_cpu(src, rows)

    @staticmethod
    def combine(y, pos, w):
        return _CpuKernels._C().moe_combine_cpu(y, pos, w)

    @staticmethod
    def combine_wgrad(dout, y, pos):
        return _CpuKernels._C().moe_combine_wgrad_cpu(dout, y, pos)

    @staticmethod
    def gmm(a, w, offs, bias=None):
        return _CpuKernels._C().moe_gmm_cpu(a, w, offs, bias)

    @staticmethod
    def gmm_act(a, w, offs, bias, activation):
        pre = _CpuKernels._C().moe_gmm_cpu(a, w, offs, bias)
        return pre, _CpuKernels.act(pre, activation)

    @staticmethod
    def gmm_wgrad(a, dy, offs, E):
        return _CpuKernels._C().moe_gmm_wgrad_cpu(a, dy, offs, E)

    @staticmethod
    def _own_gelu(activation, *tensors):
        # tanh GELU (plain / geglu) on fp32 rows of unit stride: the C++ pass; PyTorch's fused
        # kernels elsewhere (its erf GELU and SiLU are already one fast pass, its tanh is not)
        return _base_act(activation) == "gelu" and all(
            t.dtype == torch.float32 and (t.shape[1] <= 1 or t.stride(1) == 1) for t in tensors)

    @staticmethod
    def act(pre, activation):
        if _CpuKernels._own_gelu(activation, pre):
            return _CpuKernels._C().moe_act_gelu_cpu(pre, activation in GATED)
        return apply_act(pre, activation)

    @staticmethod
    def act_bwd(dhid, pre, activation, reuse_dhid=False):
        if _CpuKernels._own_gelu(activation, pre, dhid):
            gated = activation in GATED
            return _CpuKernels._C().moe_act_gelu_bwd_cpu(dhid, pre, gated,
                                                         reuse_dhid and not gated)
        return act_backward(dhid, pre, activation, reuse_dhid)


class _CudaKernels(_TorchKernels):
    """CUDA C++ routing / permutation / weighted un-permutation (csrc/moe_cuda.cu); the expert
    GEMMs are Triton's grouped GEMMs when triton is installed, else ``torch._grouped_mm``."""

    @staticmethod
    def _C():
        from .. import _ext
        return _ext.C

    @staticmethod
    def _stream(t):
        return torch.cuda.current_stream(t.device).cuda_stream

    @staticmethod
    def route(logits, top_k, normalize):
        lf = logits.float().contiguous()
        return _CudaKernels._C().moe_route_cuda(lf, top_k, normalize, _CudaKernels._stream(lf))

    @staticmethod
    def gather(src, rows):
        return _CudaKernels._C().moe_gather_cuda(src, rows, _CudaKernels._stream(src))

    @staticmethod
    def combine(y, pos, w):
        return _CudaKernels._C().moe_combine_cuda(y, pos, w, _CudaKernels._stream(y))

    @staticmethod
    def _gemms():
        from ..backends import HAS_TRITON
        if HAS_TRITON:
            from ..triton_kernels import moe as tk
            return tk.TritonKernels
        return _TorchKernels

    @staticmethod
    def gmm(a, w, offs, bias=None):
        return _CudaKernels._gemms().gmm(a, w, offs, bias)

    @staticmethod
    def gmm_act(a, w, offs, bias, activation):
        return _CudaKernels._gemms().gmm_act(a, w, offs, bias, activation)

    @staticmethod
    def gmm_wgrad(a, dy, offs, E):
        return _CudaKernels._gemms().gmm_wgrad(a, dy, offs, E)


def _kernels(backend: str):
    if backend == "cpu":
        return _CpuKernels
    if backend == "cuda":
        return _CudaKernels
    if backend == "triton":
        from ..triton_kernels import moe as tk
        return tk.TritonKernels
    if backend == "torch":
        return _TorchKernels
    raise ValueError(f"unknown kernel backend {backend!r}")


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _moe_route_impl(logits: Tensor, top_k: int, normalize: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    w, idx = _kernels(backend).route(logits, top_k, normalize)
    return w, idx


_moe_route = torch.library.custom_op("vidgen_kernels::moe_route", mutates_args=())(_moe_route_impl)


@_moe_route.register_fake
def _(logits, top_k, normalize, backend):
    N = logits.shape[0]
    return (logits.new_empty((N, top_k), dtype=torch.float32),
            logits.new_empty((N, top_k), dtype=torch.int64))


def _route_setup(ctx, inputs, output):
    logits, top_k, normalize, backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.normalize = normalize
    ctx.set_materialize_grads(False)


def _route_grad(logits: Tensor, idx: Tensor, dw: Tensor, normalize: bool) -> Tensor:
    """Gradient of the routing weights w.r.t. the logits (plain PyTorch, O(N E))."""
    lf = logits.float()
    p = torch.softmax(lf, dim=-1)
    sel = p.gather(1, idx)
    if normalize:
        s = sel.sum(-1, keepdim=True)
        w = sel / s
        dsel = (dw - (dw * w).sum(-1, keepdim=True)) / s
    else:
        dsel = dw
    dp = torch.zeros_like(p).scatter_add_(1, idx, dsel)
    dl = p * (dp - (dp * p).sum(-1, keepdim=True))
    return dl.to(logits.dtype)


def _route_backward(ctx, dw, _didx):
    logits, idx = ctx.saved_tensors
    if dw is None:
        return None, None, None, None
    return _route_grad(logits, idx, dw, ctx.normalize), None, None, None


_moe_route_call = eager_op(_moe_route, _moe_route_impl, _route_setup, _route_backward)


def _moe_sort_impl(idx: Tensor, num_experts: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    order, tok, pos, counts, offs = _kernels(backend).sort(idx, num_experts)
    return order, tok, pos, counts, offs


_moe_sort = torch.library.custom_op("vidgen_kernels::moe_sort", mutates_args=())(_moe_sort_impl)
_moe_sort_call = eager_op(_moe_sort, _moe_sort_impl)


@_moe_sort.register_fake
def _(idx, num_experts, backend):
    P = idx.numel()
    i64 = dict(dtype=torch.int64)
    return (idx.new_empty((P,), **i64), idx.new_empty((P,), **i64),
            idx.new_empty(tuple(idx.shape), **i64), idx.new_empty((num_experts,), **i64),
            idx.new_empty((num_experts,), **i64))


def _moe_unpermute_impl(y: Tensor, weights: Tensor, pos: Tensor, tok: Tensor, order: Tensor,
                        backend: str) -> Tensor:
    return _kernels(backend).combine(y, pos, weights)


_moe_unpermute = torch.library.custom_op("vidgen_kernels::moe_unpermute",
                                        mutates_args=())(_moe_unpermute_impl)


@_moe_unpermute.register_fake
def _(y, weights, pos, tok, order, backend):
    return y.new_empty((pos.shape[0], y.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    y, weights, pos, tok, order, backend = inputs
    ctx.save_for_backward(y, weights, pos, tok, order)
    ctx.backend = backend


def _unpermute_backward(ctx, dout):
    y, weights, pos, tok, order = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        dy, dw = differentiable_vjp(lambda y, w: kernel_combine_torch(y, pos, w), (y, weights),
                                    ctx.needs_input_grad[:2], (dout,))
        return dy, dw, None, None, None, None
    dout = dout.contiguous()
    dy, dw = _moe_unpermute_bwd_call(dout, y, weights, pos, tok, order, ctx.backend)
    return dy, dw, None, None, None, None


def _moe_unpermute_bwd_impl(dout: Tensor, y: Tensor, weights: Tensor, pos: Tensor, tok: Tensor,
                            order: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    K = _kernels(backend)
    acc = _acc(dout.dtype)
    ws = weights.reshape(-1).index_select(0, order).to(acc).unsqueeze(1)  # weight per sorted row
    dy = K.gather(dout, tok)  # a fresh [P, C] tensor: scaled in place when already fp32 / fp64
    dy = dy.mul_(ws) if dy.dtype == acc else dy.to(acc) * ws
    dw = K.combine_wgrad(dout, y, pos)
    return dy.to(y.dtype), dw


_moe_unpermute_bwd = torch.library.custom_op("vidgen_kernels::moe_unpermute_bwd",
                                            mutates_args=())(_moe_unpermute_bwd_impl)
_moe_unpermute_bwd_call = eager_op(_moe_unpermute_bwd, _moe_unpermute_bwd_impl)


@_moe_unpermute_bwd.register_fake
def _(dout, y, weights, pos, tok, order, backend):
    return y.new_empty(y.shape), weights.new_empty(weights.shape)


_moe_unpermute_call = eager_op(_moe_unpermute, _moe_unpermute_impl,
                               _unpermute_setup, _unpermute_backward)


def _moe_experts_fwd_impl(x: Tensor, tok: Tensor, pos: Tensor, w1: Tensor, b1: Optional[Tensor],
                          w2: Tensor, b2: Optional[Tensor], offs: Tensor, activation: str,
                          backend: str) -> tuple[Tensor, Tensor]:
    """Permutation ``xs = x[tok]``, grouped GEMM 1 (+ bias + activation epilogue) and grouped
    GEMM 2 (+ bias). Returns ``y [P, C]`` and ``pre [P, F or 2F]``. ``xs`` lives only inside
    the call: backward keeps ``x [N, C]`` (k times smaller) and gathers again."""
    K = _kernels(backend)
    xs = K.gather(x, tok)
    pre, hid = K.gmm_act(xs, w1, offs, b1, activation)
    y = K.gmm(hid, w2, offs, b2)
    return y.contiguous(), pre.contiguous()


_moe_experts_fwd = torch.library.custom_op("vidgen_kernels::moe_experts_fwd",
                                          mutates_args=())(_moe_experts_fwd_impl)


@_moe_experts_fwd.register_fake
def _(x, tok, pos, w1, b1, w2, b2, offs, activation, backend):
    P = tok.shape[0]
    return x.new_empty((P, w2.shape[2])), x.new_empty((P, w1.shape[2]))


def _moe_experts_bwd_impl(dy: Tensor, x: Tensor, tok: Tensor, pos: Tensor, w1: Tensor,
                          w2: Tensor, offs: Tensor, pre: Tensor, activation: str, need_b1: bool,
                          need_b2: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``dx`` (``[N, C]``: the k slot gradients of each token summed), ``dw1``, ``dw2``,
    ``db1`` (``[E, 2F or F]``), ``db2`` (``[E, C]``; zeros of shape ``[0]`` when the bias is
    absent)."""
    K = _kernels(backend)
    E = w1.shape[0]
    hid = K.act(pre, activation)
    dw2 = K.gmm_wgrad(hid, dy, offs, E)
    del hid
    # dpre overwrites dhid (one [P, F] buffer for both, which pays for recomputing hid)
    dpre = K.act_bwd(K.gmm(dy, w2.transpose(1, 2), offs), pre, activation, reuse_dhid=True)
    xs = K.gather(x, tok)
    dw1 = K.gmm_wgrad(xs, dpre, offs, E)
    dxs = K.gmm(dpre, w1.transpose(1, 2), offs)
    db1 = segment_sum(dpre, offs, E) if need_b1 else x.new_zeros((0,))
    db2 = segment_sum(dy, offs, E) if need_b2 else x.new_zeros((0,))
    dx = K.combine(dxs.contiguous(), pos, None)
    return dx.contiguous(), dw1.contiguous(), dw2.contiguous(), db1, db2


_moe_experts_bwd = torch.library.custom_op("vidgen_kernels::moe_experts_bwd",
                                          mutates_args=())(_moe_experts_bwd_impl)
_moe_experts_bwd_call = eager_op(_moe_experts_bwd, _moe_experts_bwd_impl)


@_moe_experts_bwd.register_fake
def _(dy, x, tok, pos, w1, w2, offs, pre, activation, need_b1, need_b2, backend):
    E = w1.shape[0]
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
            x.new_empty((E, w1.shape[2]) if need_b1 else (0,)),
            x.new_empty((E, w2.shape[2]) if need_b2 else (0,)))


def _experts_setup(ctx, inputs, output):
    x, tok, pos, w1, b1, w2, b2, offs, activation, backend = inputs
    y, pre = output
    # neither xs = x[tok] nor hid = act(pre) is kept: backward rebuilds both (a gather and an
    # elementwise pass) from x and pre
    ctx.save_for_backward(x, tok, pos, w1, w2, offs, pre, b1, b2)  # (b1, b2: for create_graph)
    ctx.args = (activation, b1 is not None, b2 is not None, backend)
    # pre is an output only so that it can be saved: no [P, F] zero gradient is made for it
    ctx.set_materialize_grads(False)


def _experts_backward(ctx, dy, _dpre):
    x, tok, pos, w1, w2, offs, pre, b1, b2 = ctx.saved_tensors
    activation, has_b1, has_b2, backend = ctx.args
    if dy is None:  # y unused (never in moe_ffn, which always combines it)
        dy = pre.new_zeros((pre.shape[0], w2.shape[2]))
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        nig = ctx.needs_input_grad
        dx, dw1, db1, dw2, db2 = differentiable_vjp(
            lambda x, w1, b1, w2, b2: _moe_experts_fwd_impl(x, tok, pos, w1, b1, w2, b2, offs,
                                                            activation, "torch")[0],
            (x, w1, b1, w2, b2), (nig[0], nig[3], nig[4], nig[5], nig[6]), (dy,))
        return dx, None, None, dw1, db1, dw2, db2, None, None, None
    dx, dw1, dw2, db1, db2 = _moe_experts_bwd_call(
        dy.contiguous(), x, tok, pos, w1, w2, offs, pre, activation, has_b1, has_b2, backend)
    return (dx, None, None, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, None,
            None, None)


_moe_experts_fwd_call = eager_op(_moe_experts_fwd, _moe_experts_fwd_impl,
                                 _experts_setup, _experts_backward)


# ---- forward-mode AD: the same pipeline, each stage with a jvp --------------------------------
# Under one eager torch.func.jvp or a forward_ad dual level, moe_pipeline(forward_ad=True) runs the
# stages below: autograd.Functions with the kernels' forward, the custom ops' backward (reverse
# mode through the primal is unchanged) and a jvp built from the same kernels (grouped GEMMs,
# gathers, the weighted combine). A stage's tangent goes through _KernelTangent, whose backward
# (a gradient *through* the tangent, which sCM / MeanFlow recipes stop) recomputes the tangent
# with the PyTorch contract ("torch" kernels) and differentiates that.
def _df_mul_differentiable(g: Tensor, z: Tensor, base: str) -> Tensor:
    """``g * act'(z)`` in plain elementwise ops that autograd differentiates again (PyTorch has
    no derivative of ``silu_backward``)."""
    if base == "silu":
        s = torch.sigmoid(z)
        return g * s * (1 + z * (1 - s))
    if base == "gelu_exact":
        return g * (0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) +
                    z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5)
    k = (2 / torch.pi) ** 0.5
    t = torch.tanh(k * (z + 0.044715 * z ** 3))
    return g * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z))


def act_jvp(pre: Tensor, dpre: Tensor, activation: str, differentiable: bool = False) -> Tensor:
    """Tangent of :func:`apply_act` at ``pre`` along ``dpre`` (pre's dtype, fp32 math):
    ``act'(pre) dpre``; gated ``f'(a) da b + f(a) db``. ``differentiable``: in ops that autograd
    can differentiate (a gradient through the tangent), else PyTorch's fused backward kernels."""
    z = pre if pre.dtype in (torch.float32, torch.float64) else pre.float()
    dz = dpre.to(z.dtype)
    base = _base_act(activation)
    df_mul = (lambda g, z: _df_mul_differentiable(g, z, base)) if differentiable else \
        (lambda g, z: _df_mul(g, z, base))
    if activation not in GATED:
        return df_mul(dz, z).to(pre.dtype)
    F_ = pre.shape[-1] // 2
    a, b, da, db = z[:, :F_], z[:, F_:], dz[:, :F_], dz[:, F_:]
    return (df_mul(da * b, a) + _f(a, base) * db).to(pre.dtype)


def _route_tangent(logits: Tensor, idx: Tensor, weights: Tensor, dlogits: Tensor,
                   normalize: bool) -> Tensor:
    """Tangent of the routing weights ``[N, k]`` fp32 along ``dlogits`` (plain PyTorch)."""
    p = torch.softmax(logits.float(), dim=-1)
    dl = dlogits.float()
    dsel = (p * (dl - (p * dl).sum(-1, keepdim=True))).gather(1, idx)
    if not normalize:
        return dsel
    return (dsel - weights * dsel.sum(-1, keepdim=True)) / p.gather(1, idx).sum(-1, keepdim=True)


def _seg_rows(t: Tensor, offs: Tensor, P: int) -> Tensor:
    """``t[e]`` for every sorted row: ``[P, M]`` (a bias tangent without a GEMM to fuse into)."""
    return t.index_select(0, segment_ids(offs, P).clamp_(max=t.shape[0] - 1))


def _gmm_tangent(K, a: Optional[Tensor], w: Tensor, da: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor], offs: Tensor, P: int) -> Optional[Tensor]:
    """Tangent of ``gmm(a, w) + bias`` over ``P`` rows: ``gmm(da, w) + gmm(a, dw) + db`` (None:
    no tangent; ``a`` is needed only with ``dw``)."""
    out = None
    bias = db  # (any strides: the GEMM epilogue reads both)
    if da is not None:
        out, bias = K.gmm(da, w, offs, bias), None
    if dw is not None:
        t = K.gmm(a, dw, offs, bias)
        out, bias = (t if out is None else out + t), None
    if bias is not None:
        out = _seg_rows(bias, offs, P)
    return out


def _experts_tangent(backend, x, tok, offs, pre, w1, b1, w2, dx, dw1, db1, dw2, db2,
                     activation):
    """Tangent of the experts' ``y [P, C]`` (forward: :func:`_moe_experts_fwd_impl`; ``pre`` is
    its saved pre-activation). ``backend="torch"`` (differentiated through by
    :class:`_KernelTangent`) recomputes ``pre`` from ``x``, ``w1``, ``b1``, so that a gradient
    through the tangent reaches them through ``act'(pre)`` too."""
    K = _kernels(backend)
    xs = K.gather(x, tok) if dw1 is not None or backend == "torch" else None
    if backend == "torch":
        pre = K.gmm(xs, w1, offs, b1)
    dxs = K.gather(dx, tok) if dx is not None else None
    P = tok.shape[0]
    dpre = _gmm_tangent(K, xs, w1, dxs, dw1, db1, offs, P)
    del xs, dxs
    hid = K.act(pre, activation) if dw2 is not None else None
    if dpre is None:
        dhid = None
    elif activation in GATED or backend == "torch":
        dhid = act_jvp(pre, dpre, activation, differentiable=backend == "torch")
    else:  # act'(pre) dpre is the backward's elementwise pass: the kernels' (in place on dpre)
        dhid = K.act_bwd(dpre, pre, activation, reuse_dhid=True)
    dy = _gmm_tangent(K, hid, w2, dhid, dw2, db2, offs, P)
    return dy if dy is not None else pre.new_zeros((pre.shape[0], w2.shape[2]))


def _combine_tangent(backend, y, weights, pos, dy, dweights):
    """Tangent of the weighted un-permutation ``out [N, C]`` (:func:`_moe_unpermute_impl`)."""
    K = _kernels(backend)
    out = K.combine(dy.contiguous(), pos, weights) if dy is not None else None
    if dweights is not None:
        t = K.combine(y, pos, dweights.float().contiguous())
        out = t if out is None else out + t
    return out if out is not None else y.new_zeros((pos.shape[0], y.shape[1]))


class _KernelTangent(torch.autograd.Function):
    """``fn(backend, *tensors, *consts)``: a stage's tangent from the kernels. Its backward (a
    gradient through the tangent) differentiates ``fn("torch", ...)``, the PyTorch contract."""

    @staticmethod
    def forward(fn, backend, consts, *tensors):
        return fn(backend, *tensors, *consts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn, _, ctx.consts = inputs[:3]
        ctx.save_for_backward(*inputs[3:])

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        grads = recomputed_vjp(lambda *ts: ctx.fn("torch", *ts, *ctx.consts), saved, needs, (g,))
        return (None, None, None) + tuple(grads)


def _fixed_routing(expert_index: Tensor) -> tuple[Tensor, Tensor]:
    """``(weights fp32 [N, 1] of ones, idx int64 [N, 1])`` of a given expert per token."""
    N = expert_index.numel()
    idx = expert_index.reshape(N, 1).to(torch.int64)
    return torch.ones((N, 1), dtype=torch.float32, device=idx.device), idx


class _RoutingForwardAD(torch.autograd.Function):
    """Routing and the counting sort (forward-mode AD stage): ``(weights, idx, order, tok, pos,
    counts, offs)``; only the weights have a tangent (from the logits')."""

    @staticmethod
    def forward(logits, expert_index, top_k, normalize, num_experts, backend):
        if expert_index is not None:
            weights, idx = _fixed_routing(expert_index)
        else:
            weights, idx = _moe_route_impl(logits, top_k, normalize, backend)
        return (weights, idx) + tuple(_moe_sort_impl(idx, num_experts, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, expert_index, _, normalize, _, _ = inputs
        ctx.normalize = normalize
        ctx.routed = expert_index is None
        ctx.save_for_backward(logits, output[1])
        ctx.save_for_forward(logits, output[1], output[0])
        ctx.mark_non_differentiable(*output[1:] if ctx.routed else output)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dw, *_):
        logits, idx = ctx.saved_tensors
        dl = _route_grad(logits, idx, dw, ctx.normalize) if dw is not None and ctx.routed \
            else None
        return dl, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dlogits, *_):
        logits, idx, weights = ctx.saved_tensors
        dw = None
        if dlogits is not None and ctx.routed:
            dw = _route_tangent(logits, idx, weights, dlogits, ctx.normalize)
        return (dw,) + (None,) * 6


class _ExpertsForwardAD(torch.autograd.Function):
    """The experts stage (inputs and outputs of the custom op ``moe_experts_fwd``) with a jvp:
    ``dy = gmm(act'(pre) (gmm(dx[tok], w1) + gmm(x[tok], dw1) + db1), w2) + gmm(act(pre), dw2)
    + db2`` on the kernels' grouped GEMMs."""

    @staticmethod
    def forward(x, tok, pos, w1, b1, w2, b2, offs, activation, backend):
        return _moe_experts_fwd_impl(x, tok, pos, w1, b1, w2, b2, offs, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _experts_setup(ctx, inputs, output)
        x, tok, pos, w1, b1, w2, b2, offs = inputs[:8]
        ctx.save_for_forward(x, tok, offs, output[1], w1, b1, w2)
        ctx.mark_non_differentiable(output[1])

    backward = staticmethod(_experts_backward)

    @staticmethod
    def jvp(ctx, dx, _dtok, _dpos, dw1, db1, dw2, db2, *_):
        x, tok, offs, pre, w1, b1, w2 = ctx.saved_tensors
        activation, _, _, backend = ctx.args
        dy = _KernelTangent.apply(_experts_tangent, backend, (activation,), x, tok, offs, pre,
                                  w1, b1, w2, dx, dw1, db1, dw2, db2)
        return dy, None


class _UnpermuteForwardAD(torch.autograd.Function):
    """The weighted un-permutation (custom op ``moe_unpermute``) with a jvp:
    ``combine(dy, w) + combine(y, dw)``."""

    @staticmethod
    def forward(y, weights, pos, tok, order, backend):
        return _moe_unpermute_impl(y, weights, pos, tok, order, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _unpermute_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.set_materialize_grads(False)

    backward = staticmethod(_unpermute_backward)

    @staticmethod
    def jvp(ctx, dy, dweights, *_):
        y, weights, pos = ctx.saved_tensors
        return _KernelTangent.apply(_combine_tangent, ctx.backend, (), y, weights, pos, dy,
                                    dweights)


def _pipeline_forward_ad(x2, router_logits, w1, w2, b1, b2, top_k, activation, normalize_weights,
                         expert_index, backend):
    """:func:`moe_pipeline` with ``forward_ad``: stages whose autograd Functions carry a jvp and
    call the kernels directly. Eager only: a compiled jvp takes the reference, and where the
    reference loop breaks the graph and the jvp runs eagerly, dynamo is kept from tracing the
    raw kernel calls here (a warning per kernel, and a graph break each): called through
    ``_moe_forward_ad.pipeline_forward_ad``, its ``torch.compiler.disable``'d form."""
    N, E = x2.shape[0], w1.shape[0]
    weights, idx, order, tok, pos, counts, offs = _RoutingForwardAD.apply(
        router_logits, expert_index, top_k, bool(normalize_weights), E, backend)
    y, _ = _ExpertsForwardAD.apply(x2, tok, pos, w1, b1, w2, b2, offs, activation, backend)
    out = _UnpermuteForwardAD.apply(y, weights, pos, tok, order, backend)
    aux, zl = _losses(router_logits, counts, N * idx.shape[1])
    return out, aux, zl, counts


def moe_pipeline(x2: Tensor, router_logits: Optional[Tensor], w1: Tensor, w2: Tensor,
                 b1: Optional[Tensor], b2: Optional[Tensor], top_k: int, activation: str,
                 normalize_weights: bool, expert_index: Optional[Tensor], backend: str,
                 forward_ad: bool = False):
    """The grouped pipeline on ``x2 [N, C]`` with kernel set ``backend`` (``cpu``, ``triton`` or
    ``torch``); returns ``(out [N, C], aux, z, counts)``. ``forward_ad``: the stages with a
    forward-mode derivative (inside an eager jvp / dual level)."""
    N = x2.shape[0]
    E = w1.shape[0]
    if forward_ad:
        from ._moe_forward_ad import pipeline_forward_ad  # (imports torch._dynamo: not at import)
        return pipeline_forward_ad(x2, router_logits, w1, w2, b1, b2, top_k, activation,
                                   normalize_weights, expert_index, backend)
    if expert_index is not None:
        weights, idx = _fixed_routing(expert_index)
        k = 1
    else:
        weights, idx = _moe_route_call(router_logits, top_k, bool(normalize_weights), backend)
        k = top_k
    order, tok, pos, counts, offs = _moe_sort_call(idx, E, backend)
    y, _ = _moe_experts_fwd_call(x2, tok, pos, w1, b1, w2, b2, offs, activation, backend)
    out = _moe_unpermute_call(y, weights, pos, tok, order, backend)
    aux, zl = _losses(router_logits, counts, N * k)
    return out, aux, zl, counts


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _empty_batch(x: Tensor, router_logits: Optional[Tensor], w1: Tensor, w2: Tensor,
                 b1: Optional[Tensor], b2: Optional[Tensor], E: int) -> MoEOutput:
    """``moe_ffn`` on zero tokens (every backend): an empty ``out``, ``aux_loss = z_loss = 0``
    and zero counts. Both losses and ``out`` stay in the graph of every input (through empty
    slices, so an inf weight gives no NaN) and their gradients are zeros, so a training step on
    an empty batch runs like any other."""
    zero = sum(t[:0].sum().float() for t in (x, router_logits, w1, w2, b1, b2) if t is not None)
    out = x * 0 + zero.to(x.dtype)
    z_loss = zero if router_logits is not None else x.new_zeros((), dtype=torch.float32)
    return MoEOutput(out, zero.clone(), z_loss, torch.zeros(E, dtype=torch.int64,
                                                            device=x.device))


def moe_ffn(x: Tensor, router_logits: Optional[Tensor], w1: Tensor, w2: Tensor, *,
            top_k: int = 2, activation: str = "gelu", b1: Optional[Tensor] = None,
            b2: Optional[Tensor] = None, normalize_weights: bool = True,
            expert_index: Optional[Tensor] = None, backend: Optional[str] = None) -> MoEOutput:
    """Dropless top-k Mixture-of-Experts FFN (definition in the module docstring).

    Args:
        x: ``[..., C]`` tokens (flattened to N).
        router_logits: ``[N, E]`` (any float dtype; routing math in fp32). May be None only
            with ``expert_index``.
        w1: ``[E, C, F]`` (``[E, C, 2F]`` for swiglu / geglu / geglu_exact); w2: ``[E, F, C]``.
        top_k: experts per token, ``1 <= top_k <= E`` (ignored with ``expert_index``).
        activation: one of ``ACTIVATIONS``; ``"gelu"`` is the tanh approximation,
            ``"gelu_exact"`` the erf form.
        b1: ``[E, F]`` (``[E, 2F]``) or None; b2: ``[E, C]`` or None.
        normalize_weights: renormalise the top-k probabilities to sum to 1.
        expert_index: ``[N]`` integer expert per token (weight 1), replacing the router.
        backend: ``None`` (current default), ``"auto"``, ``"reference"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"`` (CUDA C++ routing / sort / permutations with the Triton
            grouped GEMMs).

    Under ``torch.autocast`` for x's device, x, w1, w2, b1 and b2 are first cast to the
    autocast dtype (as ``F.linear``'s operands are) and the op runs with autocast off: ``out``
    has that dtype and equals the call on the cast operands.

    Returns:
        ``MoEOutput(out [..., C] x.dtype, aux_loss fp32 [], z_loss fp32 [],
        tokens_per_expert int64 [E])``. Gradients flow to x, router_logits, w1, w2, b1, b2;
        under one eager ``torch.func.jvp`` / ``forward_ad`` dual level the kernels also carry
        tangents of all six (module docstring). Zero tokens give an empty ``out``, losses 0,
        zero counts and zero gradients.
    Raises:
        ValueError / TypeError naming the argument for shapes that do not chain, ``top_k``
        outside ``[1, E]``, logits rows not matching the tokens, out-of-range ``expert_index``,
        an unknown activation.
    """
    op = "moe_ffn"
    ac = autocast_dtype(x)
    if ac is not None:  # the experts are GEMMs: autocast's operand casts, then autocast off
        x, w1, w2, b1, b2 = cast_floating(ac, x, w1, w2, b1, b2)
        with torch.autocast(x.device.type, enabled=False):
            return moe_ffn(x, router_logits, w1, w2, top_k=top_k, activation=activation, b1=b1,
                           b2=b2, normalize_weights=normalize_weights,
                           expert_index=expert_index, backend=backend)
    N, C, E, _ = _check_inputs(x, router_logits, w1, w2, top_k, activation, b1, b2,
                               expert_index, normalize_weights, op)
    name = resolve(backend, x.device, x.dtype, SUPPORTED_DTYPES, op,
                   (x, router_logits, w1, w2, b1, b2), forward_ad=True, needs=BACKEND_NEEDS)
    if N == 0:  # (after resolve: a backend that cannot run here is refused for any N)
        return _empty_batch(x, router_logits, w1, w2, b1, b2, E)
    if name == "reference" and x.is_meta:
        # shapes only (model init / shape inference on the meta device), whichever backend was
        # asked for: the reference loop needs the routing's values; the custom ops' fake
        # implementations do not
        name = "cpu"
    if name == "reference":
        return moe_ffn_reference(x, router_logits, w1, w2, top_k=top_k, activation=activation,
                                 b1=b1, b2=b2, normalize_weights=normalize_weights,
                                 expert_index=expert_index)
    out, aux, zl, counts = moe_pipeline(x.reshape(N, C), router_logits, w1, w2, b1, b2, top_k,
                                        activation, normalize_weights, expert_index, name,
                                        forward_ad=forward_ad_active())
    return MoEOutput(out.reshape(x.shape), aux, zl, counts)
