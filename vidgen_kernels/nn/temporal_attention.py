"""Causal temporal attention layer built on :func:`vidgen_kernels.temporal_attention`.

:class:`CausalTemporalAttention` is the temporal half of a factorised (spatial / temporal) video
transformer block: tokens ``[B, T*S, C]`` (frame-major: all ``S`` spatial positions of frame 0,
then frame 1, ...) attend along the frame axis only, each spatial position separately::

    qkv = Linear(C, 3C)(x).view(B, T, S, 3, H, D)       # views, no permute copy
    q, k = norm_q(q), norm_k(k)                         # optional per-head QK norm over D
    o = temporal_attention(q, k, v, causal, RoPE-1D over frames)   # [B, T, S, H, D]
    out = Linear(C, C)(o.view(B, T*S, C))

Streaming (autoregressive frame generation): pass a :class:`TemporalKVCache`; ``x`` then holds
only the new frames, their queries are placed after the cached frames (``q_offset``), the cache
is extended with their keys/values, and the output equals the corresponding frames of one
full-sequence call (for ``causal=True``; with ``causal=False`` the new frames see each other
and the past, i.e. block-causal attention).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ._common import check_qk_norm, check_tokens, in_recompute, qk_norms
from ..ops._checks import check_eps, check_flags, check_sizes
from ..ops.rope import check_theta, tables_cacheable
from ..ops.temporal_attention import temporal_attention

__all__ = ["CausalTemporalAttention", "TemporalKVCache", "rope_1d_tables"]


@dataclasses.dataclass
class TemporalKVCache:
    """Past keys and values of one :class:`CausalTemporalAttention` layer, each
    ``[B, T_past, S, H, D]``: keys after the QK norm and before RoPE (the rotation is applied
    inside the op at absolute frame positions, so cached keys never need re-rotating).

    One cache per layer; ``CausalTemporalAttention.forward(x_new, T_new, S, kv_cache=cache)``
    reads and extends it. Keys/values are appended with ``torch.cat`` (autograd-safe; a step
    costs one copy of the cache, negligible next to the projections for the frame counts of
    video models).

    Activation checkpointing (``torch.utils.checkpoint``) of calls that read the cache works:
    each call with autograd on records the frame offset it started at, and the recompute run
    during backward reads the frames before that offset and leaves the cache as it is
    (``use_reentrant=False`` gives the gradients of the un-checkpointed calls exactly; the
    reentrant variant runs the forward without autograd, so no gradient reaches earlier frames
    through the cache, as for any tensor that is not an argument of the checkpointed function).
    A recompute finds its call by the attention input's storage, which works when that input
    is the checkpointed function's own input; when ``fn`` computes it (``x + attn(norm(x))``),
    pass ``context_fn=TemporalKVCache.checkpoint_contexts``, which records the offsets in order
    and replays them. It is also needed when one input tensor (or views of it) is read by
    several calls on a cache, one of them checkpointed: a recompute then cannot tell the calls
    apart and raises, rather than read another call's frames. ``reset()`` forgets the frames and the offsets; use a fresh cache (or
    ``reset()``) per sequence.
    """

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    # (input key) -> frame offset of each call made with autograd on, for checkpoint recomputes
    # (AMBIGUOUS: two live calls read the same input tensor at different offsets)
    offsets: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # (input key) -> weak reference to the input tensor of the call that recorded the offset
    owners: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    MAX_OFFSETS = 4096  # calls remembered (a recompute of an older one raises)
    AMBIGUOUS = -1

    def __post_init__(self):
        """A cache built with frames (``TemporalKVCache(k=..., v=...)``) is checked as appended
        frames are (a list or a lone ``k`` raised AttributeError / TypeError at the first call)."""
        if self.k is not None or self.v is not None:
            self._check_pair(self.k, self.v)

    @staticmethod
    def _check_pair(k, v) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 5:
                got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"TemporalKVCache: {name} must be a [B, T_new, S, H, D] tensor, "
                                 f"got {got}")
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"TemporalKVCache: k and v must have one shape, dtype and device, got "
                             f"k {tuple(k.shape)} ({k.dtype}, {k.device}) and v "
                             f"{tuple(v.shape)} ({v.dtype}, {v.device})")

    @property
    def num_frames(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``[B, T_new, S, H, D]`` keys/values; returns the whole cached sequence."""
        self.k, self.v = self.extended(k, v)
        return self.k, self.v

    def extended(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The cached sequence with ``[B, T_new, S, H, D]`` keys/values appended, checked but
        not stored: the layer stores it only after its attention has run, so a call that raises
        (an unsupported dtype, a size limit, out of memory) leaves the cache as it was."""
        self._check_pair(k, v)
        if self.k is None:
            return k, v
        want = (self.k.shape[0],) + tuple(self.k.shape[2:])
        got = (k.shape[0],) + tuple(k.shape[2:])
        if want != got or k.dtype != self.k.dtype or k.device != self.k.device:
            raise ValueError(
                f"TemporalKVCache: the cache holds [B, T_past, S, H, D] = {tuple(self.k.shape)} "
                f"({self.k.dtype}, {self.k.device}) but the new frames are {tuple(k.shape)} "
                f"({k.dtype}, {k.device}): B, S, H, D, dtype and device must match")
        return torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)

    def reset(self) -> None:
        self.k = self.v = None
        self.offsets.clear()
        self.owners.clear()

    def __getstate__(self):  # the offsets name storage addresses of this process only
        return {"k": self.k, "v": self.v, "offsets": {}, "owners": {}}

    def _record(self, key, x: Tensor, off: int) -> None:
        """Remember ``off`` for the call whose attention input is ``x``. The same input read
        again at another offset while the first call's input is still alive (one tensor passed
        to two calls) makes the key ambiguous: a recompute of either raises instead of reading
        the other's frames. A dead owner is an earlier call whose storage was freed and reused:
        its entry is replaced."""
        prev = self.offsets.get(key)
        owner = self.owners.get(key)
        if prev is not None and prev != off and owner is not None and owner() is not None:
            off = self.AMBIGUOUS
        self.offsets.pop(key, None)  # (re-inserted last: the bound below drops the oldest)
        self.offsets[key] = off
        # the owner of the storage: a view made inside the checkpointed function (x.flatten())
        # dies after the forward while its base (the checkpoint's input) lives on
        self.owners[key] = weakref.ref(x if x._base is None else x._base)
        while len(self.offsets) > self.MAX_OFFSETS:  # bounded: forget the oldest call
            old = next(iter(self.offsets))
            del self.offsets[old]
            self.owners.pop(old, None)

    @staticmethod
    def checkpoint_contexts():
        """``context_fn`` for ``torch.utils.checkpoint(fn, ..., use_reentrant=False,
        context_fn=TemporalKVCache.checkpoint_contexts)``: the forward records the frame offset
        of every call that reads a cache inside ``fn``, in order, and the recompute replays
        them, whatever ``fn`` computes the attention's input from. Needed when that input is
        not the checkpointed function's own input (``x + attn(norm(x), ...)``, as in a DiT
        block); without it a recompute finds its call by the input's storage only."""
        calls: list = []
        return _CacheCalls(calls, record=True), _CacheCalls(calls, record=False)


class _CacheCalls:
    """One checkpointed call's cache offsets: recorded by its forward, replayed in order by its
    recompute (a per-thread stack: the recompute runs in the thread running backward)."""

    class _Stack(threading.local):
        def __init__(self):
            self.stack: list = []

    _active = _Stack()

    def __init__(self, calls: list, record: bool):
        self.calls, self.record, self.pos = calls, record, 0

    @classmethod
    def current(cls) -> Optional["_CacheCalls"]:
        stack = cls._active.stack
        return stack[-1] if stack else None

    def __enter__(self):
        self._active.stack.append(self)
        self.pos = 0
        return self

    def __exit__(self, *exc):
        self._active.stack.remove(self)
        return False

    def replay(self, cache: TemporalKVCache) -> int:
        if self.pos >= len(self.calls) or self.calls[self.pos][0] is not cache:
            raise RuntimeError(
                "CausalTemporalAttention: the checkpoint recompute reads its kv_caches in another "
                "order than its forward did (checkpoint_contexts replays the forward's calls in "
                "order)")
        off = self.calls[self.pos][1]
        self.pos += 1
        return off


def rope_1d_tables(length: int, head_dim: int, theta: float = 10000.0, device=None
                   ) -> tuple[Tensor, Tensor]:
    """cos / sin ``[length, head_dim / 2]`` float32 tables of 1D RoPE over positions
    ``0 .. length-1``: angle ``t * theta ** (-2i / head_dim)`` (computed in float64)."""
    check_theta(theta, "rope_1d_tables")
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv)
    return ang.cos().float(), ang.sin().float()


class CausalTemporalAttention(nn.Module):
    """Attention along the frame axis of ``[B, T*S, C]`` video tokens.

    Args:
        dim: channels ``C``.
        num_heads: heads ``H`` (``head_dim = C / H``).
        qk_norm: ``None``, ``"layer"`` (LayerNorm over head_dim) or ``"rms"`` (RMSNorm over
            head_dim), applied to q and k per head, with learnable ``[head_dim]`` weights (and
            biases for ``"layer"``).
        rope: 1D rotary embedding over frame positions (fused into the attention kernel).
        rope_theta: RoPE base.
        causal: frame ``t`` attends to frames ``<= t``.
        bias: biases of the qkv and output projections.
        interleaved: RoPE pairs ``(2i, 2i+1)`` (True) or ``(i, i + D/2)`` (half-split).
        eps: epsilon of the QK norms.

    Parameters: ``qkv`` (``Linear(C, 3C)``, output channels ordered ``[q | k | v]``, each
    ``[H, D]``), ``proj`` (``Linear(C, C)``), and ``norm_q`` / ``norm_k`` when ``qk_norm`` is set.
    The kernel backend follows the package's selection (``vidgen_kernels.use_backend`` etc.).
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: Optional[str] = None,
                 rope: bool = True, rope_theta: float = 10000.0, causal: bool = True,
                 bias: bool = True, interleaved: bool = True, eps: float = 1e-6, device=None,
                 dtype=None):
        super().__init__()
        check_sizes("CausalTemporalAttention", dim=dim, num_heads=num_heads)
        check_flags("CausalTemporalAttention", rope=rope, causal=causal, bias=bias,
                    interleaved=interleaved)
        if dim % num_heads:
            raise ValueError(f"CausalTemporalAttention: dim={dim} must be a multiple of "
                             f"num_heads={num_heads}")
        head_dim = dim // num_heads
        if rope and head_dim % 2:
            raise ValueError(f"CausalTemporalAttention: RoPE needs an even head_dim, got "
                             f"{head_dim} (dim={dim}, num_heads={num_heads})")
        if rope:
            check_theta(rope_theta, "CausalTemporalAttention", "rope_theta")
        check_qk_norm("CausalTemporalAttention", qk_norm)
        eps = check_eps("CausalTemporalAttention", eps)
        fk = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.qk_norm, self.rope, self.rope_theta = qk_norm, bool(rope), float(rope_theta)
        self.causal, self.interleaved = bool(causal), bool(interleaved)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **fk)
        self.proj = nn.Linear(dim, dim, bias=bias, **fk)
        self.norm_q, self.norm_k = qk_norms(qk_norm, head_dim, eps, "CausalTemporalAttention",
                                            **fk)
        # RoPE tables per device: one [L, D/2] pair for the longest sequence seen so far; a call
        # with T_k frames uses the first T_k rows (a contiguous view: nothing is rebuilt or copied)
        self._rope_cache: dict[tuple[str, Optional[int]], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, qk_norm={self.qk_norm}, "
                f"rope={self.rope}, rope_theta={self.rope_theta:g}, causal={self.causal}, "
                f"interleaved={self.interleaved}")

    def rope_tables(self, num_frames: int, device) -> tuple[Tensor, Tensor]:
        """cos / sin ``[num_frames, head_dim / 2]`` float32 on ``device`` (built once, cached)."""
        device = torch.device(device)
        if not tables_cacheable():  # traced (graph, fake / proxy mode): built there, not cached
            return rope_1d_tables(num_frames, self.head_dim, self.rope_theta, device)
        key = (device.type, device.index)
        tabs = self._rope_cache.get(key)
        if tabs is None or tabs[0].shape[0] < num_frames:
            # grow geometrically so that streaming one frame at a time rebuilds O(log T) times
            length = max(num_frames, 2 * tabs[0].shape[0] if tabs is not None else num_frames)
            with torch.inference_mode(False):  # not an inference tensor: training reuses it
                tabs = rope_1d_tables(length, self.head_dim, self.rope_theta, device)
            self._rope_cache[key] = tabs
        return tabs[0][:num_frames], tabs[1][:num_frames]

    def forward(self, x: Tensor, T: int, S: int, *,
                kv_cache: Optional[TemporalKVCache] = None) -> Tensor:
        """``x [B, T*S, C]`` (frame-major) -> ``[B, T*S, C]``.

        With ``kv_cache``, ``x`` holds the ``T`` newest frames; they follow the cache's
        ``T_past`` frames (RoPE positions ``T_past ..``) and the cache is extended by them.
        """
        check_tokens("CausalTemporalAttention", x, self.dim, f"[B, T*S, C] with C={self.dim}",
                     self.qkv.weight)
        B, N, C = x.shape
        for name, val in (("T", T), ("S", S)):
            if isinstance(val, bool) or not isinstance(val, (int, torch.SymInt)):
                raise TypeError(f"CausalTemporalAttention: {name} must be an int, got "
                                f"{type(val).__name__} {val!r}")
        if T < 1 or S < 1:
            raise ValueError(f"CausalTemporalAttention: T and S must be >= 1, got T={T}, S={S}")
        if N != T * S:
            raise ValueError(f"CausalTemporalAttention: x has {N} tokens but T*S = {T}*{S} = "
                             f"{T * S}")
        if kv_cache is not None and not isinstance(kv_cache, TemporalKVCache):
            raise TypeError("CausalTemporalAttention: kv_cache must be a "
                            f"vidgen_kernels.nn.TemporalKVCache or None, got "
                            f"{type(kv_cache).__name__}")
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, S, 3, H, D).unbind(3)  # [B, T, S, H, D] views
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q_offset, store = 0, False
        if kv_cache is not None:
            k, v, q_offset, store = self._with_cache(kv_cache, x, k, v, T)
        cos = sin = None
        if self.rope:
            cos, sin = self.rope_tables(q_offset + T, x.device)
        o = temporal_attention(q, k, v, causal=self.causal, cos=cos, sin=sin,
                               interleaved=self.interleaved, q_offset=q_offset)
        if store:  # stored once the attention ran: a failed call changes nothing
            # contiguous: the first call's k / v are views into the fused qkv output, which
            # would keep q alive in the cache (1.5x the bytes) and change the strides the
            # next call's compiled graph guards on (a copy of these frames only; later calls
            # store torch.cat's result, already contiguous: no copy)
            kv_cache.k, kv_cache.v = k.contiguous(), v.contiguous()
        return self.proj(o.view(B, N, C))

    @staticmethod
    def _with_cache(cache: TemporalKVCache, x: Tensor, k: Tensor, v: Tensor, T: int):
        """``(k, v, q_offset, store)``: the cached frames followed by the new ones. A call made
        during a backward pass is an activation-checkpoint recompute of an earlier call: it
        reads the frames before that call's recorded offset and stores nothing."""
        if torch.compiler.is_compiling():
            return (*cache.extended(k, v), cache.num_frames, True)
        try:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
        except RuntimeError:  # no storage (torch.func's wrappers): no recompute bookkeeping
            key = None
        calls = _CacheCalls.current()
        if in_recompute():  # inside backward: a recompute
            off = calls.replay(cache) if calls is not None and not calls.record \
                else cache.offsets.get(key)
            if off == cache.AMBIGUOUS:
                raise RuntimeError(
                    "CausalTemporalAttention: an activation-checkpoint recompute cannot tell which "
                    "of several calls it repeats: the same input tensor was passed to more than "
                    "one call reading this kv_cache. Pass "
                    "context_fn=TemporalKVCache.checkpoint_contexts to torch.utils.checkpoint "
                    "(it replays the calls in order), or give each call its own input tensor")
            if off is None or cache.num_frames < off + T:
                raise RuntimeError(
                    "CausalTemporalAttention: called with a kv_cache during a backward pass (an "
                    "activation-checkpoint recompute) but the cache no longer holds the frames "
                    "this call saw: it was reset or replaced after the forward, or the "
                    "attention's input is computed inside the checkpointed function (pass "
                    "context_fn=TemporalKVCache.checkpoint_contexts to torch.utils.checkpoint)")
            if off:
                k, v = torch.cat([cache.k[:, :off], k], 1), torch.cat([cache.v[:, :off], v], 1)
            return k, v, off, False
        off = cache.num_frames
        k, v = cache.extended(k, v)
        if calls is not None and calls.record:
            calls.calls.append((cache, off))
        if key is not None and (torch.is_grad_enabled() or x.requires_grad):  # (reentrant: grad off)
            cache._record(key, x, off)
        return k, v, off, True
