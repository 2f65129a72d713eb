"""Building blocks shared by the vidgen models.

Every attention and AdaLN computation goes through the public ``vidgen_kernels`` API
(``rope3d_attention``, ``adaln_modulate``, ``nn.AdaLNZero``, ``nn.RoPE3DAttention``,
``nn.CausalTemporalAttention``), so the kernel backend follows ``vidgen_kernels.use_backend``;
the models wrap their forward in :func:`backend_scope` so that ``backend="reference"`` gives the
pure-PyTorch path of the same model.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vidgen_kernels as vk


def backend_scope(backend: Optional[str]):
    """``vidgen_kernels.use_backend(backend)``, or a no-op for ``None`` (the package default)."""
    return vk.use_backend(backend) if backend is not None else contextlib.nullcontext()


class ModelBackend:
    """``model.backend``: the kernel backend of a model's forward (``None``: the package
    default). Setting it sets it on each block of ``model.blocks`` too, whose forward
    (:func:`block_forward`) enters it itself. Put it before ``nn.Module`` in the bases."""

    @property
    def backend(self) -> Optional[str]:
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: Optional[str]):
        self.__dict__["_backend"] = value
        for block in self.__dict__.get("_modules", {}).get("blocks", ()):
            block.backend = value


def block_forward(forward):
    """Decorator of a model block's ``forward``: runs it under the block's ``backend`` (the
    model's, see :class:`ModelBackend`). Activation checkpointing recomputes a block during
    backward, outside the model's forward and its backend scope: the recompute then ran the
    default kernels (with ``backend="reference"`` it saved other tensors than the forward had:
    ``CheckpointError``)."""
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        with backend_scope(self.backend):
            return forward(self, *args, **kwargs)
    return wrapped


def in_recompute() -> bool:
    """Whether this eager forward runs inside a backward pass: an activation-checkpoint
    recompute (non-reentrant or reentrant) of a forward that has already run."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def keeps_losses() -> bool:
    """Whether a forward stores its losses as attributes (``aux_loss``): not while
    ``torch.export`` traces it (the exported program returns the output only; what export traces
    runs on fake tensors, which it takes back out of attributes afterwards, with a warning), and
    not in an activation-checkpoint recompute (the forward stored them; the recompute's copies
    would keep its autograd graph, activations included, alive until the next forward)."""
    return not torch.compiler.is_exporting() and not in_recompute()


class CopyableLossesMixin:
    """For modules that keep the last forward's losses as plain tensor attributes (``aux_loss``):
    a copy (``copy.deepcopy`` for an EMA, pickle, ``torch.save(model)``) holds them detached,
    since tensors attached to an autograd graph cannot be deep-copied. Put it before
    ``nn.Module`` in the bases."""

    def _state(self) -> dict:
        return {k: (v.detach() if isinstance(v, Tensor) and v.grad_fn is not None else v)
                for k, v in self.__dict__.items()}

    def __getstate__(self):
        return self._state()

    def __deepcopy__(self, memo):
        # a copy of _state() also for a parametrized module (torch re-classes it: its
        # __getstate__ raises, and its __deepcopy__ copies __dict__ as it is unless the class
        # defines one)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._state(), memo))
        return new


# ---------------------------------------------------------------------------------------------
# Input checks shared by the models
# ---------------------------------------------------------------------------------------------
def check_sizes(minimum: int = 1, *, owner: str = "", **sizes) -> None:
    """Keyword arguments that are sizes or counts: ints >= ``minimum`` (bools refused), e.g.
    ``check_sizes(latent_channels=z, owner="SmallVideoVAE")`` or ``check_sizes(0, num_down=n)``;
    the message starts with ``owner`` and names a value's type when it is not an int (a numpy
    integer or a float reads as if its value were wrong)."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            got = repr(v) if isinstance(v, int) and not isinstance(v, bool) else \
                f"{v!r} of type {type(v).__name__}"
            where = f"{owner}: " if owner else ""
            raise ValueError(f"{where}{name} must be an int >= {minimum}, got {got}")


def check_config_sizes(config, *names: str) -> None:
    """Config fields that are sizes: ints >= 1 (0 heads was a ZeroDivisionError)."""
    check_sizes(owner=type(config).__name__, **{name: getattr(config, name) for name in names})


def check_config_backend(config) -> None:
    """``config.backend``: None (the package's selection) or a backend name, checked when the
    model is built rather than at its first forward."""
    vk.backends.check_backend_name(config.backend, "backend", allow_none=True)


def check_patch_size(patch_size, n: int = 3) -> tuple:
    """``patch_size``: ``n`` integers >= 1 in any sequence (tuple, list, an OmegaConf list, a
    numpy array), returned as a tuple of Python ints (a 0 was a ZeroDivisionError at the first
    forward)."""
    try:
        p = tuple(operator.index(v) for v in patch_size if not isinstance(v, bool))
        ok = not isinstance(patch_size, str) and len(p) == len(patch_size) == n and min(p) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"patch_size must be {n} ints >= 1 (frames, height, width), got {patch_size!r}")
    return p


def check_ffn_width(name: str, width, **given) -> None:
    """An FFN width derived from the config (``int(hidden_size * mlp_ratio)`` and the like) must be
    >= 1; ``given``: the options it came from, for the message."""
    if not isinstance(width, int) or width < 1:
        opts = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"{name} = {width!r} from {opts}; it must be >= 1 (raise mlp_ratio)")


def check_input_tensor(name: str, v, shape: str) -> None:
    """A model input that must be a tensor (``x``: a list or array failed with an
    AttributeError on ``.dim()``)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(v).__name__}")


def check_input_dtype(name: str, v: Tensor, param: Tensor) -> None:
    """A model input in the dtype of the parameters it meets first (torch's own error, "mat1
    and mat2 must have the same dtype", names no argument). Not checked under ``torch.autocast``
    for the input's device type, where mixed dtypes are legal."""
    # (a quantized layer's integer weight takes floating inputs: no check against it). The
    # autocast state is read only on a mismatch, and without torch.amp.is_autocast_available,
    # which torch 2.11's dynamo cannot trace (a graph break: fullgraph compiles failed)
    if param.is_floating_point() and v.dtype != param.dtype and not (
            v.device.type != "meta" and torch.is_autocast_enabled(v.device.type)):
        raise TypeError(f"{name} has dtype {v.dtype} but the model's parameters are {param.dtype}: "
                        f"pass {name}.to({param.dtype}) or run the model under torch.autocast")


def check_text(text: Tensor, B: int, width: int, name: str = "text_dim") -> Tensor:
    """Validate condition embeddings ``text [1 or B, L >= 1, width]`` and expand them to ``B``."""
    if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[-1] != width:
        shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
        raise ValueError(f"text embeddings must be [B, L, {name}={width}], got {shape}")
    if not (text.shape[0] == 1 or text.shape[0] == B):  # (`in` is wrong on symbolic sizes in dynamo)
        raise ValueError(f"text batch {text.shape[0]} does not match the latent batch B={B}")
    if text.shape[1] < 1:
        raise ValueError(f"text must have at least one token, got shape {tuple(text.shape)}")
    return text.expand(B, -1, -1)


def check_timesteps(t, B: int, device) -> Tensor:
    """Diffusion times as float32 ``[B]`` from a scalar or a ``[B]`` tensor/number."""
    t = torch.as_tensor(t, device=device, dtype=torch.float32)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must be a scalar or [B]=[{B}], got shape {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------------
# Embedding layers
# ---------------------------------------------------------------------------------------------
def dit_init_(model: nn.Module, x_embedder: "PatchEmbed3D", t_embedder: "TimestepEmbedder") -> None:
    """DiT initialisation in place: xavier-uniform linears with zero biases (except AdaLN and the
    final layer, zero-initialised by their modules), xavier patch embedding, N(0, 0.02) timestep MLP."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "adaln" not in name and "final_layer" not in name:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` (any shape) -> ``[*t, dim]``.

    Flow-matching times in ``[0, 1]`` are scaled by 1000 by the caller (as SD3) so that the
    frequencies spread over the usual range.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, temporal_fraction: float = 0.25,
                        device=None) -> Tensor:
    """Fixed 3D sin-cos position embedding ``[t*h*w, dim]`` (frame-major, as :class:`PatchEmbed3D`'s
    tokens): ``temporal_fraction`` of the channels encode the frame, the rest half height, half
    width (DiT's 2D sin-cos extended to time, as Latte / CogVideoX 1.0). ``dim`` divisible by 8."""
    if dim % 8:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 8, got {dim}")
    t, h, w = grid
    dt = int(dim * temporal_fraction) // 4 * 4
    ds = (dim - dt) // 2

    def axis(n: int, d: int) -> Tensor:
        if d == 0:
            return torch.zeros(n, 0, device=device)
        return timestep_embedding(torch.arange(n, device=device, dtype=torch.float32), d)

    et, eh, ew = axis(t, dt), axis(h, ds), axis(w, dim - dt - ds)
    return torch.cat([et[:, None, None].expand(t, h, w, -1), eh[None, :, None].expand(t, h, w, -1),
                      ew[None, None, :].expand(t, h, w, -1)], dim=-1).reshape(t * h * w, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> MLP (DiT). ``t`` ``[B]`` (or ``[B, T]`` per frame) in ``[0, 1]``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size
        self.t_scale = t_scale

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t * self.t_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class PatchEmbed3D(nn.Module):
    """Spacetime patchify: ``[B, T, C, H, W]`` -> tokens ``[B, (T/pt)*(H/ph)*(W/pw), D]``,
    frame-major (t, then h, then w)."""

    def __init__(self, patch_size=(1, 2, 2), in_channels: int = 4, hidden_size: int = 512):
        super().__init__()
        self.patch_size = check_patch_size(patch_size)
        self.in_channels = in_channels
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def grid(self, x: Tensor) -> tuple[int, int, int]:
        """Validate ``x`` ``[B, T, C, H, W]`` and return the token grid ``(T', H', W')``."""
        if x.dim() != 5:
            raise ValueError(f"expected a video tensor [B, T, C, H, W], got shape {tuple(x.shape)}")
        B, T, C, H, W = x.shape
        pt, ph, pw = self.patch_size
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {C} (shape {tuple(x.shape)})")
        if H % ph or W % pw:
            raise ValueError(f"latent H, W = ({H}, {W}) must be divisible by the patch size ({ph}, {pw})")
        if T % pt:
            raise ValueError(f"latent frame count {T} must be divisible by the temporal patch {pt}")
        return T // pt, H // ph, W // pw

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C, H, W]`` -> contiguous tokens ``[B, T'*H'*W', D]``.

        The ``Conv3d`` (kernel = stride = patch) computed as one GEMM over the patches: the
        conv's output is channels-first, and its ``flatten(2).transpose(1, 2)`` token view
        strides each token's channels by N, which every consumer then reads column-wise (the
        fused AdaLN and gated residual ~4x slower on such rows) or copies; CPU ``slow_conv3d``
        is also slower than the GEMM. Same parameters (``proj.weight [D, C, pt, ph, pw]``)."""
        T, h, w = self.grid(x)
        B, C = x.shape[0], x.shape[2]
        pt, ph, pw = self.patch_size
        # [B, T', pt, C, H', ph, W', pw] -> [B, T', H', W', C, pt, ph, pw]: the weight's (C, pt,
        # ph, pw) order; one copy of the (few-channel) input
        p = x.reshape(B, T, pt, C, h, ph, w, pw).permute(0, 1, 4, 6, 3, 2, 5, 7)
        p = p.reshape(B, T * h * w, C * pt * ph * pw)
        return F.linear(p, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch_size, channels: int) -> Tensor:
    """Inverse of :class:`PatchEmbed3D`: ``[B, N, pt*ph*pw*C]`` -> ``[B, T, C, H, W]``."""
    B = x.shape[0]
    t, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(B, t, h, w, pt, ph, pw, channels)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # B, t, pt, C, h, ph, w, pw
    return x.reshape(B, t * pt, channels, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Queries from the tokens, keys/values from the text (no RoPE), via
    ``vidgen_kernels.rope3d_attention`` without tables (plain attention, ``S_k != S_q``)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, *, qk_norm: Optional[str] = "rms"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.context_dim = context_dim
        self.norm_q = vk.nn.HeadNorm(self.head_dim, qk_norm, 1e-6) if qk_norm else nn.Identity()
        self.norm_k = vk.nn.HeadNorm(self.head_dim, qk_norm, 1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, C = x.shape
        L = context.shape[1]
        q = self.norm_q(self.q(x).view(B, N, self.num_heads, self.head_dim))
        k, v = self.kv(context).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        out = vk.rope3d_attention(q, self.norm_k(k), v)
        return self.proj(out.reshape(B, N, C))


class GEGLU(nn.Module):
    """``Linear(d, 2h) -> a * gelu(b) -> Linear(h, d)`` (the GEGLU FFN of Shazeer 2020)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio * 2 / 3)  # keep the parameter count of a 4x MLP
        check_ffn_width("GEGLU hidden width int(dim * mlp_ratio * 2 / 3)", hidden, dim=dim,
                        mlp_ratio=mlp_ratio)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * F.gelu(b, approximate="tanh"))


class FinalLayer(nn.Module):
    """DiT's final layer: adaLN (shift, scale; zero-init) -> Linear (zero-init)."""

    def __init__(self, hidden_size: int, out_features: int, cond_dim: Optional[int] = None):
        super().__init__()
        cond_dim = cond_dim or hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_features)
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor, residual: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """``x`` ``[B, N, D]``, ``c`` ``[B, D]`` or per-frame ``[B, F, D]``; ``residual = (y, gate)``:
        the last block's pending ``x + gate * y``, fused into the norm (``gated_residual_adaln``)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        if residual is None:
            return self.linear(vk.adaln_modulate(x, shift, scale, eps=1e-6))
        return self.linear(vk.gated_residual_adaln(x, *residual, shift, scale, eps=1e-6)[1])
