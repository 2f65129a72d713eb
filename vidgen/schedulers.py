"""Noise schedulers: rectified flow matching and DDPM/DDIM.

Conventions (all tensors broadcast over a leading batch dimension; ``t`` is ``[B]`` or a scalar,
or ``[B, T]`` per-frame timesteps for video tensors ``[B, T, C, H, W]``):

* :class:`FlowMatchingScheduler` (SD3 / Flux / Wan): ``x_t = (1 - t) x_0 + t * noise`` with
  ``t`` in ``[0, 1]`` (``t = 1`` is pure noise); the model predicts the velocity
  ``v = noise - x_0``; sampling integrates ``dx/dt = v`` with Euler steps from ``t = 1`` to 0.
  ``shift`` warps the timesteps as SD3: ``t' = shift * t / (1 + (shift - 1) * t)``.
* :class:`DDPMScheduler` (Ho et al. 2020, Nichol & Dhariwal 2021): discrete steps
  ``0 .. N-1``, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; ``"epsilon"`` or
  ``"v_prediction"`` (``v = sqrt(abar) eps - sqrt(1 - abar) x_0``); ancestral DDPM steps and
  deterministic DDIM steps (eta 0); Min-SNR-gamma loss weights (Hang et al. 2023).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ._random import randn

__all__ = ["FlowMatchingScheduler", "DDPMScheduler"]


def _expand(t: Tensor, x: Tensor, cast: bool = True) -> Tensor:
    """Broadcast ``t`` (scalar, ``[B]`` or per-frame ``[B, T]``, each dim 1 or x's) against
    ``x`` ``[B, ...]`` (a floating ``t`` cast to x's dtype unless ``cast=False``)."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() > x.dim() or any(not (t.shape[i] == 1 or t.shape[i] == x.shape[i])
                                for i in range(t.dim())):
        raise ValueError(f"t must be a scalar, [B] or per-frame [B, T] matching x's leading dims "
                         f"{tuple(x.shape[:2])} (or 1), got shape {tuple(t.shape)}")
    if cast and t.is_floating_point():
        t = t.to(x.dtype)
    return _pad_dims(t, x.dim())


def _pad_dims(t: Tensor, n: int) -> Tensor:
    """``t`` with trailing size-1 dims up to ``n`` dims (lined up on its leading dims)."""
    return t.reshape(tuple(t.shape) + (1,) * (n - t.dim()))  # (a 0-d t with n = 0: reshape(()))


def _check_steps(n, name: str = "num_inference_steps") -> int:
    """``n`` as a Python int >= 1 (numpy integers too; not bools or floats)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return int(n)


def _real(v, name: str) -> float:
    """``v`` as a Python float: a real number (numpy scalars, 0-d tensors), not a bool."""
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or
                                   (isinstance(v, Tensor) and v.dim() == 0 and v.is_floating_point())):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    return float(v)


def _hi(x: Tensor) -> torch.dtype:
    """The dtype schedule coefficients are computed in before they meet ``x``: float64 (float32
    on MPS, which has no float64). ``1 - abar`` near ``t = 0`` is lost when abar is first rounded
    to fp16 / bf16 (abar rounds to 1: zero noise, 0/0 in the DDPM posterior)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


class FlowMatchingScheduler:
    """Rectified-flow scheduler.

    Times ``t`` are checked where it costs no device sync, as :class:`DDPMScheduler` checks its
    steps: Python numbers and CPU tensors must be finite and in ``[0, 1]``; CUDA (and other
    device) tensors, and code being traced by ``torch.compile``, are not checked. :meth:`step`
    goes either way (``t_next < t`` samples; ``t_next > t`` inverts, data towards noise).

    Args:
        num_inference_steps: default number of Euler steps of :meth:`timesteps`.
        shift: timestep shift (1.0: none; SD3 uses 3.0 at 1024px); > 1 spends more steps at
            high noise.
    """

    def __init__(self, num_inference_steps: int = 50, shift: float = 1.0):
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or \
                not 0 < shift < math.inf:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        self.num_inference_steps = _check_steps(num_inference_steps)
        self.shift = float(shift)

    def shift_t(self, t: Tensor) -> Tensor:
        """``shift * t / (1 + (shift - 1) * t)`` (identity for shift 1), clamped to ``[0, 1]``."""
        s = self.shift
        r = s * t / (1 + (s - 1) * t)
        # clamped: the rounding of s * t and 1 + (s - 1) * t put shift_t(1) above 1 for most
        # shifts (1.0000001 at shift 0.5 in fp32), a time outside [0, 1]
        return min(max(r, 0.0), 1.0) if isinstance(r, (int, float)) else r.clip(0, 1)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x_0 + t * noise``."""
        _check_times(t, "t")
        t = _expand(t, x0).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """The regression target of the model: ``noise - x_0``."""
        return noise - x0

    def sample_t(self, batch: int, *, generator: Optional[torch.Generator] = None,
                 device=None, logit_normal: bool = False) -> Tensor:
        """Training timesteps ``[B]`` in (0, 1): uniform (or logit-normal, SD3), then shifted."""
        if logit_normal:
            t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
        else:
            t = torch.rand(batch, generator=generator, device=device)
        return self.shift_t(t)

    def timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> Tensor:
        """``N + 1`` decreasing times from 1 to 0 (shifted): step ``i`` goes ``t[i] -> t[i+1]``."""
        n = _check_steps(self.num_inference_steps if num_inference_steps is None
                         else num_inference_steps)
        return self.shift_t(torch.linspace(1.0, 0.0, n + 1, device=device))

    @staticmethod
    def step(velocity: Tensor, t: Tensor, t_next: Tensor, x_t: Tensor) -> Tensor:
        """One Euler step ``x_{t_next} = x_t + (t_next - t) * v`` (``t_next - t`` taken in the
        precision of the times, then cast to ``x_t``'s dtype); ``t_next < t`` samples,
        ``t_next > t`` inverts (data towards noise)."""
        _check_times(t, "t")
        _check_times(t_next, "t_next")
        # each lined up with x_t first: a per-video t [B] with a per-frame t_next [B, T]
        dt = _expand(t_next, x_t, cast=False) - _expand(t, x_t, cast=False)
        return x_t + (dt.to(x_t.dtype) if dt.is_floating_point() else dt) * velocity

    @staticmethod
    def predict_x0(velocity: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """``x_0 = x_t - t * v``."""
        _check_times(t, "t")
        return x_t - _expand(t, x_t) * velocity


def _check_times(t, name: str) -> None:
    """Flow-matching times: finite and in ``[0, 1]``, checked where it costs no device sync
    (Python / numpy numbers, CPU tensors, lists); tensors on other devices pass unchecked, and so
    does everything under torch.compile (a data-dependent check cannot be traced)."""
    if torch.compiler.is_compiling():
        return
    if isinstance(t, (numbers.Number, bool)):
        v = _real(t, name)  # not a bool or a complex number
        if not 0 <= v <= 1:  # NaN too
            raise ValueError(f"FlowMatchingScheduler: {name} must be finite times in [0, 1] "
                             f"(1 is pure noise), got {t!r}")
        return
    src, t = t, torch.as_tensor(t)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"FlowMatchingScheduler: {name} must be real times in [0, 1], got dtype {t.dtype}")
    if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"FlowMatchingScheduler: {name} must be finite times in [0, 1] "
                         f"(1 is pure noise), got {src!r}")


def _check_order(t, t_prev) -> None:
    """``t_prev < t`` elementwise where it costs no device sync (CPU tensors, numbers; not under
    torch.compile, where a data-dependent check cannot be traced); the two are lined up on their
    leading dims, as :func:`_expand` lines them up with x (a per-video ``t [B]`` with a
    per-frame ``t_prev [B, T]``)."""
    if torch.compiler.is_compiling():
        return
    t, t_prev = torch.as_tensor(t), torch.as_tensor(t_prev)
    if t.device.type != "cpu" or t_prev.device.type != "cpu" or not t.numel() or not t_prev.numel():
        return
    n = max(t.dim(), t_prev.dim())
    try:
        bad = bool((_pad_dims(t_prev, n) >= _pad_dims(t, n)).any())
    except RuntimeError:  # shapes that do not line up: _expand names them
        return
    if bad:
        raise ValueError(f"DDPMScheduler: t_prev must be < t (a step goes towards 0), got "
                         f"t={t.tolist()} and t_prev={t_prev.tolist()}")


def _cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal: ``abar(t) = cos^2(((t/N) + s) / (1 + s) * pi/2) / abar(0)``."""
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(n)], dtype=torch.float64)


class DDPMScheduler:
    """Discrete-time diffusion (DDPM training / ancestral sampling, DDIM sampling).

    Args:
        num_train_timesteps: ``N``.
        beta_schedule: ``"linear"`` (``beta_start .. beta_end``) or ``"cosine"`` (squaredcos_cap_v2).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        timestep_spacing: the sampling steps of :meth:`timesteps` (diffusers' names):
            ``"leading"`` (default; DDIM's ``0, r, 2r, ...`` with ``r = N // n``, so a few-step
            schedule starts far from pure noise: 1 step is ``[0]``, 2 are ``[500, 0]``) or
            ``"trailing"`` (``N-1, N-1-N/n, ...``: every schedule starts at the last, noisiest
            step; use it for few-step sampling).
    Attributes (float64, length N): ``betas``, ``alphas``, ``alphas_cumprod``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction_type: str = "epsilon", timestep_spacing: str = "leading"):
        num_train_timesteps = _check_steps(num_train_timesteps, "num_train_timesteps")
        if beta_schedule == "linear":
            beta_start, beta_end = _real(beta_start, "beta_start"), _real(beta_end, "beta_end")
            for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
                if not 0 < b < 1:
                    raise ValueError(f"{name} must be a number in (0, 1), got {b!r}")
            if beta_start > beta_end:
                raise ValueError(f"beta_start must be <= beta_end, got {beta_start!r} > {beta_end!r}")
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "cosine":
            betas = _cosine_betas(num_train_timesteps)
        else:
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {beta_schedule!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"timestep_spacing must be 'leading' or 'trailing', got {timestep_spacing!r}")
        self.timestep_spacing = timestep_spacing
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    # -- helpers -------------------------------------------------------------------------------
    def _table(self, device: torch.device) -> Tensor:
        """``alphas_cumprod`` where steps on ``device`` can index it without a host round trip:
        a copy on a CUDA device, made once per device (indexing the CPU table with CUDA steps
        was a blocking copy each call); the CPU table elsewhere (MPS has no float64)."""
        if device.type != "cuda":
            return self.alphas_cumprod
        tables = self.__dict__.setdefault("_device_tables", {})  # made at the first CUDA call
        if device not in tables:
            tables[device] = self.alphas_cumprod.to(device)
        return tables[device]

    def _steps(self, t, lowest: int) -> tuple[Tensor, Tensor]:
        """``(steps, table)``: ``t`` as integer steps in ``[lowest, N - 1]`` on the device of
        ``table`` (``alphas_cumprod`` there, :meth:`_table`): an integer tensor
        or number (a float step was truncated, NaN read as 'clean'); the range is checked where
        it costs no device sync (CPU tensors, Python numbers; not under torch.compile, where a
        data-dependent check cannot be traced)."""
        src = t
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"DDPMScheduler: t must be integer steps, got dtype {t.dtype}")
        if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling() and (
                int(t.min()) < lowest or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"DDPMScheduler: t must be steps in [{lowest}, "
                             f"{self.num_train_timesteps - 1}], got {src!r}")
        tab = self._table(t.device)
        return t.to(tab.device).long(), tab

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        """``abar_t`` broadcast to ``like``, in float64 (:func:`_hi`: the coefficients built from
        it are cast to ``like``'s dtype only at the end); ``t = -1`` means ``abar = 1`` (the
        clean sample)."""
        t, tab = self._steps(t, -1)
        ab = torch.where(t >= 0, tab[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return _expand(ab.to(device=like.device, dtype=_hi(like)), like, cast=False)

    def _coef(self, like: Tensor, *coefs: Tensor):
        """``coefs`` (float64) cast to ``like``'s dtype."""
        return tuple(c.to(like.dtype) for c in coefs)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` at integer steps ``t`` in ``[0, N)``."""
        steps, tab = self._steps(t, 0)
        ab = tab[steps]
        return ab / (1 - ab)

    # -- training ------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
        ab = self._abar(t, x0)
        a, s = self._coef(x0, ab.sqrt(), (1 - ab).sqrt())
        return a * x0 + s * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``v = sqrt(abar) noise - sqrt(1 - abar) x_0``."""
        ab = self._abar(t, x0)
        a, s = self._coef(x0, ab.sqrt(), (1 - ab).sqrt())
        return a * noise - s * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target for :attr:`prediction_type`."""
        return noise if self.prediction_type == "epsilon" else self.get_velocity(x0, noise, t)

    def min_snr_weights(self, t: Tensor, gamma: float = 5.0) -> Tensor:
        """Min-SNR-gamma weights per sample: ``min(SNR, gamma) / SNR`` (epsilon) or
        ``min(SNR, gamma) / (SNR + 1)`` (v-prediction). ``gamma``: a finite number > 0 (0 or
        less gave negative or zero weights, NaN gave NaN weights)."""
        g = _real(gamma, "gamma")
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        snr = self.snr(t)
        w = torch.clamp(snr, max=g)
        w = w / snr if self.prediction_type == "epsilon" else w / (snr + 1)
        return w.float()

    def sample_t(self, batch: int, *, generator=None, device=None) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    # -- sampling ------------------------------------------------------------------------------
    def pred_x0_eps(self, model_output: Tensor, t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_0, eps)`` implied by the model output at step ``t``."""
        ab = self._abar(t, x_t)
        a, s = self._coef(x_t, ab.sqrt(), (1 - ab).sqrt())
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a
        else:  # v = a eps - s x0  =>  x0 = a x_t - s v, eps = s x_t + a v
            x0 = a * x_t - s * model_output
            eps = s * x_t + a * model_output
        return x0, eps

    def timesteps(self, num_inference_steps: int, device=None) -> Tensor:
        """``num_inference_steps`` evenly spaced decreasing integer steps: ``"leading"``
        spacing ends at 0, ``"trailing"`` starts at ``N - 1`` (:attr:`timestep_spacing`)."""
        n, N = num_inference_steps, self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= N:
            raise ValueError(f"num_inference_steps must be an int in [1, {N}], got {n!r}")
        if self.timestep_spacing == "trailing":
            # N - i N / n for i < n (an arange with a fractional step can yield n + 1 values)
            steps = (N - torch.arange(n, dtype=torch.float64) * (N / n)).round().long() - 1
            return steps.to(device)
        return (torch.arange(n, device=device) * (N // n)).flip(0)

    def ddim_step(self, model_output: Tensor, t: Tensor, t_prev: Tensor, x_t: Tensor) -> Tensor:
        """Deterministic DDIM (eta 0): ``x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps``;
        ``t_prev = -1`` returns ``x_0``."""
        _check_order(t, t_prev)
        x0, eps = self.pred_x0_eps(model_output, t, x_t)
        ab_prev = self._abar(t_prev, x_t)
        a, s = self._coef(x_t, ab_prev.sqrt(), (1 - ab_prev).sqrt())
        return a * x0 + s * eps

    def ddpm_step(self, model_output: Tensor, t: Tensor, x_t: Tensor, t_prev: Optional[Tensor] = None,
                  *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Ancestral step ``t -> t_prev`` (default ``t - 1``) from the posterior
        ``q(x_prev | x_t, x_0)``: mean ``c0 x_0 + ct x_t``, variance
        ``(1 - abar_prev) / (1 - abar_t) * beta``, with ``beta = 1 - abar_t / abar_prev``.
        No noise is added when ``t_prev < 0``."""
        t = torch.as_tensor(t, device=x_t.device)
        self._steps(t, 0)  # checked as given (t = -1 was reported as its t_prev, -2)
        t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev, device=x_t.device)
        _check_order(t, t_prev)
        x0, _ = self.pred_x0_eps(model_output, t, x_t)
        ab, ab_prev = self._abar(t, x_t), self._abar(t_prev, x_t)
        beta = 1 - ab / ab_prev
        c0 = ab_prev.sqrt() * beta / (1 - ab)
        ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        var = (1 - ab_prev) / (1 - ab) * beta
        sd = var.clamp(min=1e-20).sqrt() * _expand(t_prev >= 0, x_t)  # no noise into x_0
        c0, ct, sd = self._coef(x_t, c0, ct, sd)
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)  # (on the generator's device)
        return c0 * x0 + ct * x_t + sd * noise
