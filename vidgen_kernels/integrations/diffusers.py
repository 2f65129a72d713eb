"""Patch diffusers' CogVideoX and Wan transformers with the fused vidgen_kernels ops.

Usage::

    from vidgen_kernels.integrations import diffusers as vk_diffusers
    vk_diffusers.apply(pipe.transformer)      # in place; returns the model
    vk_diffusers.remove(pipe.transformer)     # back to the original modules / processors

What is patched (weights, parameter names, dtypes and devices are unchanged; parameters are
shared with, not copied from, the original modules):

``CogVideoXTransformer3DModel``
    * ``attn1`` of every block (``CogVideoXAttnProcessor2_0``): a processor that projects q/k/v,
      applies the QK LayerNorm and calls :func:`vidgen_kernels.rope3d_attention` on ``[B, S, H, D]``
      views with the model's own ``image_rotary_emb`` (diffusers' ``[S_video, D]`` repeated
      layout, integer or fractional positions), ``rope_offset`` = text length, interleaved pairs.
      Without ``image_rotary_emb`` (CogVideoX-2B: sin-cos position embedding) it is plain flash
      attention.
    * ``norm1`` / ``norm2`` (``CogVideoXLayerNormZero``): :class:`FusedCogVideoXLayerNormZero`
      (same ``silu`` / ``linear`` / ``norm`` submodules), modulation by
      :func:`vidgen_kernels.adaln_modulate`.
    * the block forward: the attention residual ``h + gate * attn`` and ``norm2`` fused into
      :func:`vidgen_kernels.gated_residual_adaln` (text and video streams). The block's last
      residual (``h + gate_ff * ff``) stays eager: the norm after it is the next block's.
    * ``norm_out`` (``AdaLayerNorm`` with ``chunk_dim=1``): modulation by ``adaln_modulate``.

``WanTransformer3DModel``
    * ``attn1`` (self-attention, ``WanAttnProcessor``): QK RMSNorm across heads as diffusers, then
      ``rope3d_attention`` with Wan's table (``freqs_cos[..., 0::2]``, ``freqs_sin[..., 1::2]``,
      exactly the angles Wan's own rotation reads), interleaved pairs, ``rope_offset=0``.
    * ``attn2`` (text cross-attention, text-to-video models): ``rope3d_attention`` with
      ``cos=None`` (k/v have the text length).
    * the block forward (FP32LayerNorms, fp32 shift / scale / gate, per-sample or Wan 2.2
      per-token): ``norm1``'s modulation by ``adaln_modulate``; the self-attention's gated
      residual with ``norm2`` (the cross-attention norm, ``cross_attn_norm=True``: modulation by
      zeros) and the cross-attention's residual with ``norm3``'s modulation (gate 1) each by one
      ``gated_residual_adaln``. The block's last residual (``h + c_gate * ffn``) stays eager: the
      norm after it is the next block's.
    * not ``norm_out``: Wan modulates its output inline in ``WanTransformer3DModel.forward``
      (``norm_out(h.float()) * (1 + scale) + shift``, no module to swap without replacing the
      model's forward), so that one modulation per forward stays eager.

Left unpatched, with a ``warnings.warn`` naming the module and the reason: processors of another
class (fused-QKV, user-chosen ones), Wan processors with an attention backend or a context-parallel
config set, Wan image-to-video cross-attention (``add_k_proj``), blocks whose ``forward`` already
carries a hook, norms that carry a hook or whose configuration differs from the ones above.
A norm hooked after ``apply`` (a user's hook, accelerate's sequential CPU offload, which keeps
the weights on ``meta`` until the module is called) or replaced (by another class than the
LayerNorm seen at ``apply``) is called instead of read: the fused paths check for that on every
call (type and attribute checks) and run diffusers' formula around the module then.
:func:`remove` refuses (``RuntimeError``, nothing changed) while a patched block forward is
wrapped by something added after ``apply`` (``model.enable_cache(...)``: undo it first), and
keeps a processor or norm the user set after ``apply``, with a warning; submodules replaced in
a fused norm after ``apply`` (a LoRA wrapper on ``norm1.linear``) and torch hooks registered on
it are carried over to the original norm it puts back. The patched model pickles
(``torch.save(model)`` / ``torch.load``), and :func:`remove` works on the loaded copy. At run
time an ``attention_mask`` (not supported by the kernels), and for Wan an attention backend or
context-parallel config set after ``apply`` (``model.set_attention_backend``,
``enable_parallelism``) or a ``with diffusers...attention_backend(...)`` block that makes another
backend active than the one active at ``apply``, make the patched processor call the original
one, with a warning; so does a GPU on which no ``rope3d_attention`` kernel runs under the default
backend choice (a T4 / V100: the Triton kernels need compute capability 8.0), where the op would
run rotation + SDPA (``rope3d_attention_sdpa``), which is what the original processor computes.

diffusers is imported lazily, only by :func:`apply`.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import nn

import vidgen_kernels as vk
from vidgen_kernels.ops import rope3d_attention as ra
from vidgen_kernels.ops._checks import check_backend_arg

__all__ = ["apply", "remove", "is_patched", "FusedCogVideoXLayerNormZero", "FusedAdaLayerNorm"]

_STATE = "_vidgen_kernels_diffusers_patch"


def _warn(name: str, reason: str, stacklevel: int = 4):
    # stacklevel: the caller of apply()
    warnings.warn(f"vidgen_kernels.integrations.diffusers: left {name} unpatched: {reason}",
                  stacklevel=stacklevel)


# ----------------------------------------------------------------------------------------------
# attention processors
# ----------------------------------------------------------------------------------------------
def _dispatch_registry():
    """diffusers' attention-dispatch registry class (None on versions without one)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:
        return None
    return _AttentionBackendRegistry


def _has_attention_kernel(name: str) -> bool:
    """Whether backend ``name`` runs ``rope3d_attention`` (``cuda`` does not)."""
    return name in ("auto", "reference") or name in ra.SUPPORTED_DTYPES


def _no_attention_kernel(device: torch.device, backend: Optional[str]) -> Optional[str]:
    """Why the patched attention cannot run its ``rope3d_attention`` kernel, else None:
    ``backend`` (None: the process default, ``vk.current_backend()``) is one without a RoPE-3D
    attention kernel (``"cuda"``, where it is the default: ``apply`` refuses it when named), or
    the default choice (``"auto"``) on a GPU ``device`` no kernel runs on (a T4 / V100: the
    Triton kernels need compute capability 8.0, and CUDA tensors have no other kernel), where
    the op would run rotation + SDPA (``rope3d_attention_sdpa``). The original processor
    (diffusers' own rotation + SDPA, the same computation) runs instead."""
    name = backend if backend is not None else vk.current_backend()
    if not _has_attention_kernel(name):
        return f"backend {name!r} has no RoPE-3D attention kernel"
    if name != "auto" or device.type != "cuda":
        return None
    return vk.backends.why_unavailable("triton", device)


class _FallbackMixin:
    """What both patched processors hold: the original processor, the backend pinned at
    ``apply``, the attention module's name (for the fallback warning) and whether it warned."""

    # class-level defaults: a processor pickled (torch.save of a patched model) before an
    # attribute existed unpickles without it in its __dict__ and reads these
    backend: Optional[str] = None
    module_name: str = ""
    _warned: bool = False

    def __init__(self, original, backend: Optional[str] = None, module_name: str = ""):
        self.original = original
        self.backend = backend
        self.module_name = module_name
        self._warned = False

    def _no_kernel_reason(self, x: torch.Tensor) -> Optional[str]:
        why = _no_attention_kernel(x.device, self.backend)
        return None if why is None else f"no rope3d_attention kernel runs on {x.device} ({why})"

    def _fallback(self, reason: str):
        if not self._warned:
            where = f" of {self.module_name}" if self.module_name else ""
            warnings.warn(f"vidgen_kernels.integrations.diffusers: {type(self).__name__}{where} "
                          f"falls back to the original {type(self.original).__name__}: {reason}",
                          stacklevel=4)
            self._warned = True


class CogVideoXRoPE3DAttnProcessor(_FallbackMixin):
    """CogVideoX joint text+video self-attention on :func:`vidgen_kernels.rope3d_attention`."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        reason = ("attention_mask is not supported by rope3d_attention"
                  if attention_mask is not None else self._no_kernel_reason(hidden_states))
        if reason is not None:
            self._fallback(reason)
            return self.original(attn, hidden_states, encoder_hidden_states,
                                 attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != hidden_states.size(1):
            # diffusers raises a size mismatch; rope3d_attention would rotate only the first rows
            raise ValueError(f"{type(self).__name__}: image_rotary_emb has "
                             f"{image_rotary_emb[0].shape[0]} rows but there "
                             f"are {hidden_states.size(1)} video tokens (CogVideoX needs one row "
                             "per video token)")
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim)  # [B, S, H, D]
        key = key.view(b, -1, attn.heads, head_dim)
        value = value.view(b, -1, attn.heads, head_dim)
        if attn.norm_q is not None:  # LayerNorm over D: the same on [B, S, H, D] as on [B, H, S, D]
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        cos = sin = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # [S_video, D], diffusers' repeated layout
            cos, sin = cos.to(query.device), sin.to(query.device)
        out = vk.rope3d_attention(query, key, value, cos, sin, rope_offset=text_len,
                                  interleaved=True, backend=self.backend)
        out = out.reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


class WanRoPE3DAttnProcessor(_FallbackMixin):
    """Wan self-attention (RoPE-3D) or text cross-attention on :func:`vidgen_kernels.rope3d_attention`."""

    # set by diffusers' set_attention_backend / enable_parallelism after apply(): then the
    # original processor (which honours them) runs instead
    _attention_backend = None
    _parallel_config = None

    def __init__(self, original, backend: Optional[str] = None, module_name: str = ""):
        super().__init__(original, backend, module_name)
        # the backend active in diffusers' dispatcher at apply() (its DIFFUSERS_ATTN_BACKEND
        # default); a different one later means a `with attention_backend(...)` block
        self._registry = _dispatch_registry()
        self._active_at_apply = getattr(self._registry, "_active_backend", None)

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        if attention_mask is not None:
            reason = "attention_mask is not supported by rope3d_attention"
        elif attn.add_k_proj is not None:  # not patched by apply(); guard for set_processor misuse
            reason = "image-to-video added key/value branch"
        elif self._attention_backend is not None or self._parallel_config is not None:
            reason = "an attention backend or a context-parallel config was set after apply()"
        elif getattr(self._registry, "_active_backend", None) != self._active_at_apply:
            reason = ("diffusers' attention_backend(...) made another attention backend active "
                      "after apply()")
        else:
            reason = self._no_kernel_reason(hidden_states)
        if reason is not None:
            self._fallback(reason)
            # the original honours what diffusers set on this processor after apply(), for
            # this call only: remove() gives back the original as it was (a backend kept on it
            # outlived the model's reset_attention_backend())
            orig = self.original
            lent = {k: v for k in ("_attention_backend", "_parallel_config")
                    if (v := getattr(self, k)) is not None}
            kept = {k: orig.__dict__[k] for k in lent if k in orig.__dict__}
            orig.__dict__.update(lent)
            try:
                return orig(attn, hidden_states, encoder_hidden_states, attention_mask,
                            rotary_emb)
            finally:
                for k in lent:
                    if k in kept:
                        orig.__dict__[k] = kept[k]
                    else:
                        del orig.__dict__[k]
        kv_in = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if getattr(attn, "fused_projections", False):
            if not attn.is_cross_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(kv_in).chunk(2, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(kv_in)
            value = attn.to_v(kv_in)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if key.shape[0] == 1 and query.shape[0] != 1:  # text of batch 1 for a batch of latents:
            # broadcast as diffusers' SDPA does (a stride-0 view: the kernel reads it in place)
            key, value = key.expand(query.shape[0], -1, -1, -1), value.expand(query.shape[0], -1, -1, -1)
        cos = sin = None
        if rotary_emb is not None:
            freqs_cos, freqs_sin = rotary_emb  # [1, S, 1, D] each, repeated layout
            # exactly the angles Wan's rotation reads: cos of even, sin of odd columns
            cos = freqs_cos.reshape(freqs_cos.shape[-3], freqs_cos.shape[-1])[:, 0::2].contiguous()
            sin = freqs_sin.reshape(freqs_sin.shape[-3], freqs_sin.shape[-1])[:, 1::2].contiguous()
        out = vk.rope3d_attention(query, key, value, cos, sin, rope_offset=0, interleaved=True,
                                  backend=self.backend)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


# ----------------------------------------------------------------------------------------------
# norm modules (same submodule names as diffusers: state_dict keys unchanged)
# ----------------------------------------------------------------------------------------------
def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its own forward: forward (pre-)hooks,
    backward hooks, an accelerate hook (``_hf_hook``: sequential CPU offload keeps the weights on
    ``meta`` until the module is called), a diffusers hook, or a replaced ``forward``. The fused
    paths read a LayerNorm's weight instead of calling it, so they check this on every call and
    call the module instead when it is hooked (a few attribute lookups)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _forward_hooked(module)
                or module._backward_hooks or module._backward_pre_hooks
                or getattr(module, "_hf_hook", None) is not None)


def _call_norm(norm: nn.Module, cls=nn.LayerNorm) -> bool:
    """Whether a fused path must call ``norm`` instead of reading its weight / bias / eps: it
    is hooked, or it is no longer a plain ``cls`` (replaced after apply(), e.g. by a subclass
    with its own forward). Type and attribute checks only."""
    return not _layernorm_ok(norm, cls) or _hooked(norm)


def _eager_modulate(norm: nn.Module, x, shift, scale):
    """diffusers' ``norm(x) * (1 + scale) + shift`` with ``[B, C]`` shift / scale, calling
    ``norm`` (the path for a hooked norm)."""
    return norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FusedCogVideoXLayerNormZero(nn.Module):
    """diffusers' ``CogVideoXLayerNormZero`` on :func:`vidgen_kernels.adaln_modulate`.

    Holds the original ``silu``, ``linear`` and ``norm`` submodules (shared parameters).
    """

    def __init__(self, original: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.silu = original.silu
        self.linear = original.linear
        self.norm = original.norm
        self.backend = backend

    def _kw(self):
        return {"weight": self.norm.weight, "bias": self.norm.bias, "eps": self.norm.eps,
                "norm": "layer", "backend": self.backend}

    def chunks(self, temb: torch.Tensor):
        return self.linear(self.silu(temb)).chunk(6, dim=1)

    def _modulate(self, x, shift, scale):
        if _call_norm(self.norm):
            return _eager_modulate(self.norm, x, shift, scale)
        return vk.adaln_modulate(x, shift, scale, **self._kw())

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale, gate, e_shift, e_scale, e_gate = self.chunks(temb)
        h = self._modulate(hidden_states, shift, scale)
        e = self._modulate(encoder_hidden_states, e_shift, e_scale)
        return h, e, gate[:, None, :], e_gate[:, None, :]

    def forward_residual(self, hidden_states, encoder_hidden_states, attn_hidden_states,
                         attn_encoder_hidden_states, gate, enc_gate, temb):
        """``h = h + gate * attn`` (both streams) fused with this norm; returns
        ``(h, enc_h, norm_h, norm_enc_h, gate2, enc_gate2)``."""
        shift, scale, gate2, e_shift, e_scale, e_gate2 = self.chunks(temb)
        if _call_norm(self.norm):  # unfused, calling the (hooked or replaced) norm
            h = hidden_states + gate * attn_hidden_states
            e = encoder_hidden_states + enc_gate * attn_encoder_hidden_states
            return (h, e, self._modulate(h, shift, scale), self._modulate(e, e_shift, e_scale),
                    gate2[:, None, :], e_gate2[:, None, :])
        kw = self._kw()
        h, nh = vk.gated_residual_adaln(hidden_states, attn_hidden_states, gate, shift, scale, **kw)
        e, ne = vk.gated_residual_adaln(encoder_hidden_states, attn_encoder_hidden_states,
                                        enc_gate, e_shift, e_scale, **kw)
        return h, e, nh, ne, gate2[:, None, :], e_gate2[:, None, :]


class FusedAdaLayerNorm(nn.Module):
    """diffusers' ``AdaLayerNorm`` with ``chunk_dim=1`` and no embedding table (CogVideoX's
    ``norm_out``) on :func:`vidgen_kernels.adaln_modulate`; same submodules."""

    def __init__(self, original: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.chunk_dim = original.chunk_dim
        self.emb = original.emb
        self.silu = original.silu
        self.linear = original.linear
        self.norm = original.norm
        self.backend = backend

    def forward(self, x, timestep=None, temb=None):
        if self.emb is not None:  # None at apply(); as diffusers if one was set since
            temb = self.emb(timestep)
        temb = self.linear(self.silu(temb))
        shift, scale = temb.chunk(2, dim=1)
        if _call_norm(self.norm):
            return _eager_modulate(self.norm, x, shift, scale)
        return vk.adaln_modulate(x, shift, scale, weight=self.norm.weight, bias=self.norm.bias,
                                 eps=self.norm.eps, norm="layer", backend=self.backend)


# ----------------------------------------------------------------------------------------------
# block forwards (set per instance as functools.partial(fn, block), which pickles with
# torch.save(model), unlike a bound method; removed by deleting the instance attribute)
# ----------------------------------------------------------------------------------------------
def _cogvideox_block_forward(self, hidden_states, encoder_hidden_states, temb,
                             image_rotary_emb=None, attention_kwargs=None):
    # diffusers CogVideoXBlock.forward with the attention residual fused into norm2
    text_seq_length = encoder_hidden_states.size(1)
    attention_kwargs = attention_kwargs or {}
    norm_hidden_states, norm_encoder_hidden_states, gate_msa, enc_gate_msa = self.norm1(
        hidden_states, encoder_hidden_states, temb)
    attn_hidden_states, attn_encoder_hidden_states = self.attn1(
        hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb, **attention_kwargs)
    if type(self.norm2) is not FusedCogVideoXLayerNormZero or _hooked(self.norm2):
        # norm2 hooked or replaced after apply(): call it, residual unfused
        hidden_states = hidden_states + gate_msa * attn_hidden_states
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder_hidden_states
        norm_hidden_states, norm_encoder_hidden_states, gate_ff, enc_gate_ff = self.norm2(
            hidden_states, encoder_hidden_states, temb)
    else:
        (hidden_states, encoder_hidden_states, norm_hidden_states, norm_encoder_hidden_states,
         gate_ff, enc_gate_ff) = self.norm2.forward_residual(
            hidden_states, encoder_hidden_states, attn_hidden_states, attn_encoder_hidden_states,
            gate_msa, enc_gate_msa, temb)
    norm_hidden_states = torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1)
    ff_output = self.ff(norm_hidden_states)
    hidden_states = hidden_states + gate_ff * ff_output[:, text_seq_length:]
    encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_seq_length]
    return hidden_states, encoder_hidden_states


def _wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    # diffusers WanTransformerBlock.forward with the norm1 modulation on adaln_modulate and the
    # two sublayer boundaries inside the block (self-attention's gated residual + norm2,
    # cross-attention's residual + the norm3 modulation) each on one gated_residual_adaln; the
    # block's last residual (+ c_gate * ffn) stays eager: the norm after it is the next block's
    if temb.ndim == 4:  # [B, S, 6, C] (Wan 2.2 TI2V): per-token modulation
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        mods = [m.squeeze(2) for m in mods]
    else:  # [B, 6, C]
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
    backend = self._vidgen_kernels_backend
    from diffusers.models.normalization import FP32LayerNorm  # loaded: apply() or torch.load did

    def affine(norm):
        return dict(weight=norm.weight.float() if norm.weight is not None else None,
                    bias=norm.bias.float() if norm.bias is not None else None, eps=norm.eps,
                    norm="layer", backend=backend)

    def modulate(norm, x, shift, scale):
        if _call_norm(norm, FP32LayerNorm):  # diffusers' formula, calling the (hooked) norm
            return (norm(x.float()) * (1 + scale) + shift).type_as(x)
        return vk.adaln_modulate(x, shift, scale, **affine(norm))

    norm_hidden_states = modulate(self.norm1, hidden_states, shift_msa, scale_msa)
    attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    if _call_norm(self.norm2, FP32LayerNorm):  # nn.Identity (cross_attn_norm=False), or hooked
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
    else:  # norm2 is a plain LayerNorm: modulation by shift = scale = 0 (exact)
        zero = gate_msa.new_zeros(gate_msa.shape[-1])
        hidden_states, norm_hidden_states = vk.gated_residual_adaln(
            hidden_states, attn_output, gate_msa, zero, zero, **affine(self.norm2))
    attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    if _call_norm(self.norm3, FP32LayerNorm):
        hidden_states = hidden_states + attn_output
        norm_hidden_states = modulate(self.norm3, hidden_states, c_shift_msa, c_scale_msa)
    else:  # an ungated residual: gate 1 (x + 1 * y rounds once, as the eager sum does)
        one = c_shift_msa.new_ones(c_shift_msa.shape[-1])
        hidden_states, norm_hidden_states = vk.gated_residual_adaln(
            hidden_states, attn_output, one, c_shift_msa, c_scale_msa, **affine(self.norm3))
    ff_output = self.ffn(norm_hidden_states)
    hidden_states = (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)
    return hidden_states


# ----------------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------------
class _Patch:
    """What apply() changed, for remove(): (module, kind, name, original)."""

    def __init__(self):
        self.entries = []

    def set_processor(self, module, new):
        old = module.processor
        module.set_processor(new)
        self.entries.append((module, "processor", None, old))

    def set_child(self, parent, name, new):
        old = getattr(parent, name)
        setattr(parent, name, new)
        self.entries.append((parent, "child", name, old))

    def set_forward(self, module, fn, **attrs):
        module.forward = functools.partial(fn, module)
        for k, v in attrs.items():
            setattr(module, k, v)
        self.entries.append((module, "forward", tuple(attrs), fn))


def _forward_hooked(module) -> bool:
    """Whether something wraps the block's forward: a diffusers hook registry holding hooks, or a
    forward set on the instance other than the class's own forward bound to it. An emptied
    registry (``enable_cache()`` then ``disable_cache()``) leaves exactly that plain bound
    forward behind: not a hook (it kept the block unfused, with a warning about a hook)."""
    reg = getattr(module, "_diffusers_hook", None)
    if reg is not None and getattr(reg, "hooks", True):  # (a registry we do not know: hooked)
        return True
    f = module.__dict__.get("forward")
    if f is None:
        return False
    return not (getattr(f, "__self__", None) is module
                and getattr(f, "__func__", None) is type(module).forward)


def _is_patched_forward(module, fn) -> bool:
    """Whether ``module.forward`` is still the ``functools.partial(fn, module)`` apply() set."""
    f = module.__dict__.get("forward")
    return (isinstance(f, functools.partial) and f.func is fn and len(f.args) == 1
            and f.args[0] is module)


def _layernorm_ok(norm, cls=nn.LayerNorm) -> bool:
    return type(norm) is cls and len(norm.normalized_shape) == 1


def _apply_cogvideox(model, patch: _Patch, backend):
    try:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    except ImportError as e:
        _warn(type(model).__name__, f"this diffusers version lacks a class it needs ({e})")
        return

    for i, block in enumerate(model.transformer_blocks):
        name = f"transformer_blocks.{i}"
        attn = block.attn1
        proc = attn.processor
        if type(proc) is not CogVideoXAttnProcessor2_0:
            _warn(f"{name}.attn1", f"processor {type(proc).__name__} is not "
                  "CogVideoXAttnProcessor2_0 (e.g. fused QKV projections or a user processor)")
        elif attn.is_cross_attention:
            _warn(f"{name}.attn1", "cross-attention configuration")
        elif attn.norm_q is not None and not _layernorm_ok(attn.norm_q) or \
                attn.norm_k is not None and not _layernorm_ok(attn.norm_k):
            _warn(f"{name}.attn1", f"QK norm {type(attn.norm_q).__name__} is not a LayerNorm")
        else:
            patch.set_processor(attn, CogVideoXRoPE3DAttnProcessor(proc, backend, f"{name}.attn1"))

        norms_ok = True
        for nname in ("norm1", "norm2"):
            norm = getattr(block, nname)
            if type(norm) is not CogVideoXLayerNormZero:
                _warn(f"{name}.{nname}", f"{type(norm).__name__} is not CogVideoXLayerNormZero")
                norms_ok = False
            elif not _layernorm_ok(norm.norm):
                _warn(f"{name}.{nname}", "its norm is not a plain nn.LayerNorm")
                norms_ok = False
            elif _hooked(norm):
                _warn(f"{name}.{nname}", "it carries a hook (replacing it would drop the hook)")
                norms_ok = False
            else:
                patch.set_child(block, nname, FusedCogVideoXLayerNormZero(norm, backend))
        if not norms_ok:
            continue
        if type(block) is not CogVideoXBlock or _forward_hooked(block):
            _warn(f"{name} (fused gated residual)", "the block is a subclass or its forward "
                  "carries a hook; the norms are patched, the residual stays unfused")
        else:
            patch.set_forward(block, _cogvideox_block_forward)

    norm_out = getattr(model, "norm_out", None)
    if norm_out is not None:
        if not (type(norm_out) is AdaLayerNorm and norm_out.chunk_dim == 1
                and norm_out.emb is None and _layernorm_ok(norm_out.norm)):
            _warn("norm_out", "not an AdaLayerNorm(chunk_dim=1) without embedding table")
        elif _hooked(norm_out):
            _warn("norm_out", "it carries a hook (replacing it would drop the hook)")
        else:
            patch.set_child(model, "norm_out", FusedAdaLayerNorm(norm_out, backend))


def _apply_wan(model, patch: _Patch, backend):
    try:
        from diffusers.models.normalization import FP32LayerNorm
        from diffusers.models.transformers.transformer_wan import (WanAttnProcessor,
                                                                   WanTransformerBlock)
    except ImportError as e:
        _warn(type(model).__name__, f"this diffusers version lacks a class it needs ({e})")
        return

    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        for aname in ("attn1", "attn2"):
            attn = getattr(block, aname)
            proc = attn.processor
            reason = None
            if type(proc) is not WanAttnProcessor:
                reason = f"processor {type(proc).__name__} is not WanAttnProcessor"
            elif getattr(proc, "_attention_backend", None) is not None:
                reason = f"attention backend {proc._attention_backend!r} was chosen for it"
            elif getattr(proc, "_parallel_config", None) is not None:
                reason = "context-parallel config set"
            elif attn.add_k_proj is not None:
                reason = "image-to-video cross-attention (added image key/value branch)"
            elif attn.kv_inner_dim != attn.inner_dim:
                reason = "key/value head dim differs from the query head dim"
            elif aname == "attn1" and attn.is_cross_attention:
                reason = "attn1 is configured as cross-attention"
            if reason:
                _warn(f"{name}.{aname}", reason)
            else:
                patch.set_processor(attn, WanRoPE3DAttnProcessor(proc, backend, f"{name}.{aname}"))
        reason = None
        if type(block) is not WanTransformerBlock:
            reason = f"{type(block).__name__} is not WanTransformerBlock"
        elif _forward_hooked(block):
            reason = "its forward carries a hook"
        elif not all(type(getattr(block, n)) is FP32LayerNorm for n in ("norm1", "norm3")):
            reason = "norm1/norm3 are not FP32LayerNorm"
        if reason:
            _warn(f"{name} (AdaLN modulation)", reason)
        else:
            patch.set_forward(block, _wan_block_forward, _vidgen_kernels_backend=backend)


def apply(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Patch a diffusers ``CogVideoXTransformer3DModel`` or ``WanTransformer3DModel`` in place.

    Args:
        model: the transformer (e.g. ``pipe.transformer``).
        backend: passed to every kernel call (``None``: the current default, see
            ``vidgen_kernels.backends``; ``"cpu"``, ``"reference"``, ``"triton"``, ...). An
            unknown name raises here; a backend that cannot run on the model's current device
            or in its dtype warns (``apply`` then ``.to("cuda")`` is fine) and raises at a call
            made there; one with no RoPE-3D attention kernel (``"cuda"``: use ``"triton"`` or
            ``"auto"``) or whose attention kernel does not take the model's head size leaves
            the model unpatched with a warning.
    Returns:
        ``model``. Applying twice is a no-op (the first patch is kept). Unsupported modules are
        left as they are with a warning naming them.
    """
    import diffusers  # noqa: F401  (lazy: the core package never imports diffusers)
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"vidgen_kernels.integrations.diffusers.apply: model must be a diffusers "
                        f"CogVideoXTransformer3DModel or WanTransformer3DModel, got "
                        f"{type(model).__name__}")
    if backend is not None:  # a typo failed only at the first forward, naming a kernel
        check_backend_arg("vidgen_kernels.integrations.diffusers.apply", backend)
    # a backend with no attention kernel (cuda), named or the process default, raised at every
    # patched attention call
    effective = backend if backend is not None else vk.current_backend()
    if not _has_attention_kernel(effective):
        what = f"backend {backend!r}" if backend is not None else \
            f"the default backend {effective!r} (vidgen_kernels.use_backend / VIDGEN_KERNELS_BACKEND)"
        _warn(type(model).__name__, f"{what} has no RoPE-3D attention kernel (those with one: "
              f"{', '.join(sorted(ra.SUPPORTED_DTYPES))}, or 'auto' / 'reference')", stacklevel=3)
        return model
    if backend is not None:
        dev = next((p.device for p in model.parameters()), None)
        why = vk.backends.why_unavailable(backend, dev) if dev is not None and backend != "auto" \
            else None
        if why is not None:  # (a warning: the model may move to a device where it runs)
            warnings.warn(f"vidgen_kernels.integrations.diffusers.apply: backend {backend!r} "
                          f"cannot run on {dev} ({why}); the patched calls raise there until "
                          f"the model moves to a device it runs on", stacklevel=2)
        # what the named backend's attention kernel takes (auto falls back where it cannot;
        # a named one raised at the first forward): the head size decides, the dtype warns
        # (the model may be cast after apply, as it may move)
        dt = next((m.to_q.weight.dtype for m in model.modules()  # (q's projection: Wan keeps
                   if isinstance(getattr(m, "to_q", None), nn.Linear)), None)  # norms in fp32)
        if dt is not None and dt not in ra.SUPPORTED_DTYPES.get(backend, (dt,)):
            warnings.warn(f"vidgen_kernels.integrations.diffusers.apply: backend {backend!r} "
                          f"does not run {dt} attention; the patched calls raise until the model "
                          f"is cast to one of {[str(d) for d in ra.SUPPORTED_DTYPES[backend]]}",
                          stacklevel=2)
        head_dim = getattr(getattr(model, "config", None), "attention_head_dim", None)
        if isinstance(head_dim, int) and head_dim > ra.MAX_D.get(backend, head_dim):
            _warn(type(model).__name__, f"backend {backend!r} takes head_dim <= "
                  f"{ra.MAX_D[backend]}, the model's attention_head_dim is {head_dim}",
                  stacklevel=3)
            return model
    if getattr(model, _STATE, None) is not None:
        return model
    patch = _Patch()
    if isinstance(model, CogVideoXTransformer3DModel):
        _apply_cogvideox(model, patch, backend)
    elif isinstance(model, WanTransformer3DModel):
        _apply_wan(model, patch, backend)
    else:
        _warn(type(model).__name__, "only CogVideoXTransformer3DModel and WanTransformer3DModel "
              "are supported", stacklevel=3)
        return model
    object.__setattr__(model, _STATE, patch)
    return model


# the attributes in which nn.Module keeps its hooks (dicts, and a flag)
_HOOK_ATTRS = tuple(k for k in vars(nn.Module()) if "hook" in k)


def _warn_remove(name: str, msg: str):
    warnings.warn(f"vidgen_kernels.integrations.diffusers.remove: {name}: {msg}", stacklevel=4)


def _restore_child(parent, name, old, label):
    """Put the original norm ``old`` back in place of the fused one, carrying over what was
    changed on the fused module after apply() (same outputs as before remove()): replaced
    submodules (a LoRA wrapper on ``linear``, another ``norm``) are set on ``old``, its torch
    hooks move to ``old`` (their handles keep working), and its train/eval mode. A fused module
    replaced after apply() is kept; one whose forward was wrapped (accelerate, diffusers hooks)
    is left in place; both with a warning."""
    new = getattr(parent, name)
    if not isinstance(new, (FusedCogVideoXLayerNormZero, FusedAdaLayerNorm)):
        _warn_remove(label, f"it was replaced after apply() by {type(new).__name__}; left as it is")
        return
    hooks = any(getattr(new, k, None) for k in _HOOK_ATTRS)
    reason = None
    if _forward_hooked(new) or getattr(new, "_hf_hook", None) is not None:
        reason = "its forward was wrapped after apply() (an accelerate or diffusers hook)"
    elif hooks and any(getattr(old, k, None) for k in _HOOK_ATTRS):
        reason = "both it and the original module got hooks after apply()"
    if reason:
        _warn_remove(label, f"{reason}; the fused module (which computes as the original) is "
                     "left in place")
        return
    for cname, child in new._modules.items():
        if old._modules.get(cname, getattr(old, cname, None)) is not child:
            setattr(old, cname, child)
    if hooks:
        for k in _HOOK_ATTRS:
            if k in new.__dict__:
                old.__dict__[k] = new.__dict__[k]
    old.training = new.training
    setattr(parent, name, old)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the original processors, modules and forwards are put back (the same
    objects), so outputs are bit-identical to the unpatched model. Submodules replaced and hooks
    registered on the fused norms after apply() are carried over to the original norms.
    No-op on an unpatched model."""
    patch = getattr(model, _STATE, None)
    if patch is None:
        return model
    names = {id(m): n for n, m in model.named_modules()}
    for module, kind, name, fn in patch.entries:
        # a forward wrapped after apply() (model.enable_cache(...), an accelerate hook) would
        # lose its wrapper, and the wrapper would later call the removed forward: refuse first
        if kind == "forward" and not _is_patched_forward(module, fn):
            raise RuntimeError(
                f"vidgen_kernels.integrations.diffusers.remove: the forward of "
                f"{names.get(id(module), type(module).__name__)} was wrapped after apply() (e.g. "
                "model.enable_cache(...) or an offload hook); undo that first (e.g. "
                "model.disable_cache()), then remove(). Nothing was changed.")
    for module, kind, name, old in reversed(patch.entries):
        if kind == "processor":
            if isinstance(module.processor, (CogVideoXRoPE3DAttnProcessor,
                                             WanRoPE3DAttnProcessor)):
                module.set_processor(old)
            else:  # replaced after apply() (a user's processor, fused QKV): left as it is
                _warn(names.get(id(module), type(module).__name__),
                      f"its processor was replaced after apply() by "
                      f"{type(module.processor).__name__}; left as it is", stacklevel=3)
        elif kind == "child":
            parent = names.get(id(module), "")
            _restore_child(module, name, old, f"{parent}.{name}" if parent else name)
        else:
            del module.forward
            for k in name:
                delattr(module, k)
    _restore_saved_processors(model, patch, names)
    object.__delattr__(model, _STATE)
    return model


def _restore_saved_processors(model: nn.Module, patch: "_Patch", names: dict):
    """diffusers' ``fuse_qkv_projections()`` saves the processors it replaces in
    ``model.original_attn_processors`` and ``unfuse_qkv_projections()`` puts them back: after
    apply -> fuse -> remove, those saved ones are ours, and unfuse would bring the patch back
    on an unpatched model. Put the originals in their place in that dict."""
    saved = getattr(model, "original_attn_processors", None)
    if not isinstance(saved, dict):
        return
    originals = {f"{names[id(m)]}.processor": old for m, kind, _, old in patch.entries
                 if kind == "processor" and id(m) in names}
    for key, proc in saved.items():
        if isinstance(proc, (CogVideoXRoPE3DAttnProcessor, WanRoPE3DAttnProcessor)) \
                and key in originals:
            saved[key] = originals[key]


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply` patched ``model`` (and :func:`remove` has not undone it)."""
    return getattr(model, _STATE, None) is not None
