"""Training utilities: CFG null-condition dropout, EMA, flow-matching loss, AdamW set-up,
checkpoints (safetensors; ``torch.save`` with a warning where it is missing), and a progress
bar (tqdm when installed, else a plain printer)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._random import randn
from .schedulers import FlowMatchingScheduler

try:  # a dependency; where it is missing, save_checkpoint falls back to torch.save and warns
    import safetensors.torch as _st
except ImportError:  # pragma: no cover - depends on the environment
    _st = None

try:  # optional
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

__all__ = ["EMA", "cfg_dropout", "flow_matching_loss", "make_optimizer", "save_checkpoint",
           "load_checkpoint", "progress", "HAS_SAFETENSORS"]

HAS_SAFETENSORS = _st is not None


def cfg_dropout(text: Tensor, null_text: Tensor, p: float = 0.1,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Replace each sample's condition ``text [B, L, D]`` by ``null_text`` (``[1 or B, L, D]``)
    with probability ``p`` (classifier-free guidance training). The draws are made on
    ``generator``'s device (a CPU generator gives the same draws on every device)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"cfg_dropout: p must be a probability in [0, 1], got {p!r}")
    if not isinstance(text, Tensor) or text.dim() != 3:
        raise ValueError(f"cfg_dropout: text must be [B, L, D], got "
                         f"{tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}")
    if not isinstance(null_text, Tensor) or null_text.dim() != 3 or \
            not (null_text.shape[0] == 1 or null_text.shape[0] == text.shape[0]) or \
            null_text.shape[1:] != text.shape[1:]:
        raise ValueError(f"cfg_dropout: null_text must be [1 or B, L, D] = [1 or "
                         f"{text.shape[0]}, {text.shape[1]}, {text.shape[2]}], got "
                         f"{tuple(null_text.shape) if isinstance(null_text, Tensor) else type(null_text).__name__}")
    if p == 0:
        return text
    gdev = generator.device if generator is not None else text.device
    drop = (torch.rand(text.shape[0], generator=generator, device=gdev) < p).to(text.device)
    return torch.where(drop[:, None, None], null_text.to(text.device, text.dtype).expand_as(text), text)


def flow_matching_loss(model: nn.Module, x0: Tensor, text: Tensor, scheduler: FlowMatchingScheduler,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """MSE between ``model(x_t, t, text)`` and the velocity ``noise - x0``. Noise and times are
    drawn on ``generator``'s device (a CPU generator gives the same draws on every device)."""
    gdev = generator.device if generator is not None else x0.device
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    t = scheduler.sample_t(x0.shape[0], generator=generator, device=gdev).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(model(x_t, t, text), scheduler.velocity_target(x0, noise))


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))


def _first_difference(a, b) -> str:
    for (na, x), (nb, y) in zip(a, b):
        if x.shape != y.shape:
            return f"{na} {tuple(x.shape)} vs {nb} {tuple(y.shape)}"
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))][0]


class EMA:
    """Exponential moving average of a model's parameters (buffers copied).

    ``decay_t = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (warm-up), so that a short
    training run is not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        """Move the average towards ``model`` (the model it was built from, or one of the same
        architecture: same parameters and buffers in the same order and shapes)."""
        ours, theirs = list(self.model.named_parameters()), list(model.named_parameters())
        ours_b, theirs_b = list(self.model.named_buffers()), list(model.named_buffers())
        for what, a, b in (("parameters", ours, theirs), ("buffers", ours_b, theirs_b)):
            if len(a) != len(b) or any(x.shape != y.shape for (_, x), (_, y) in zip(a, b)):
                raise ValueError(f"EMA.update: model's {what} differ from the averaged model's "
                                 f"({len(b)} vs {len(a)}; first differing: "
                                 f"{_first_difference(a, b)}): pass the model the EMA was built from")
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for (_, pe), (_, p) in zip(ours, theirs):
            pe.lerp_(p.detach(), 1 - d)
        for (_, be), (_, b) in zip(ours_b, theirs_b):
            be.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, sd):
        self.decay, self.num_updates = sd["decay"], sd["num_updates"]
        self.model.load_state_dict(sd["model"])


def _unshared(sd: dict) -> dict:
    """``sd`` with a copy of each tensor whose storage an earlier one uses (tied weights, views
    of one buffer): safetensors refuses shared memory (torch.save keeps it shared)."""
    out, seen = {}, set()
    for k, v in sd.items():
        key = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def save_checkpoint(path: str, model: nn.Module, *, config: Optional[dict] = None) -> str:
    """Save ``model``'s weights (+ a JSON ``config``: a dict, or a dataclass such as a model's
    ``.config``, stored as its dict): safetensors when ``path`` ends with ``.safetensors``, else
    ``torch.save``. Without the safetensors package (a declared dependency) a ``.safetensors``
    path is written as ``<stem>.pt`` with ``torch.save`` and a ``RuntimeWarning`` naming that
    path. Returns the path written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):  # a model's .config
        config = dataclasses.asdict(config)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(config or {}, default=str)}
    if path.endswith(".safetensors"):
        if _st is not None:
            _st.save_file(_unshared(sd), path, metadata=meta)
            return path
        asked, path = path, path[: -len(".safetensors")] + ".pt"
        torch.save({"state_dict": sd, **meta}, path)
        warnings.warn(f"save_checkpoint: wrote {path} with torch.save, not {asked}: the safetensors "
                      "package is not installed (it is a dependency of vidgen-kernels: "
                      "pip install safetensors)", RuntimeWarning, stacklevel=2)
        return path
    torch.save({"state_dict": sd, **meta}, path)
    return path


def load_checkpoint(path: str, model: Optional[nn.Module] = None, map_location="cpu"):
    """Load weights written by :func:`save_checkpoint` (into ``model`` if given).
    Returns ``(state_dict, config dict)``."""
    if path.endswith(".safetensors"):
        if _st is None:
            raise RuntimeError("safetensors is not installed; cannot read " + path)
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise TypeError("load_checkpoint: map_location must be None, a str or a torch.device "
                            f"for a .safetensors file, got {type(map_location).__name__}")
        sd = _st.load_file(path, device=str(map_location or "cpu"))
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            cfg = json.loads((f.metadata() or {}).get("config", "{}"))
    else:
        obj = torch.load(path, map_location=map_location, weights_only=True)
        sd, cfg = obj["state_dict"], json.loads(obj.get("config", "{}"))
    if model is not None:
        model.load_state_dict(sd)
    return sd, cfg


class _Printer:
    """Minimal progress bar used when tqdm is missing: prints ~10 lines per phase."""

    def __init__(self, iterable=None, total=None, desc="", disable=False):
        self.iterable, self.desc, self.disable = iterable, desc, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.t0, self.postfix = 0, time.time(), ""
        self._next = 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix_str(self, s: str):
        self.postfix = s

    def update(self, k: int = 1):
        self.n += k
        if self.disable or self.total is None:
            return
        if self.n >= self._next or self.n == self.total:
            self._next = self.n + max(1, self.total // 10)
            el = time.time() - self.t0
            print(f"{self.desc}: {self.n}/{self.total} [{el:.1f}s] {self.postfix}", file=sys.stderr, flush=True)

    def close(self):
        pass


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             disable: bool = False):
    """tqdm if installed, else a plain printer with the same small interface."""
    if _tqdm is not None:
        return _tqdm(iterable, total=total, desc=desc, disable=disable)
    return _Printer(iterable, total=total, desc=desc, disable=disable)
