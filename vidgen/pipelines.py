"""Sampling pipelines with classifier-free guidance (flow matching, Euler steps).

The conditional and null embeddings go through ONE forward per step (batched ``[cond; null]``);
``v = v_null + guidance_scale * (v_cond - v_null)``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .schedulers import FlowMatchingScheduler
from .training import progress

__all__ = ["generate_video", "generate_image"]


@torch.no_grad()
def generate_video(model: nn.Module, text: Tensor, null_text: Tensor, *, num_frames: int,
                   height: int, width: int, channels: Optional[int] = None,
                   scheduler: Optional[FlowMatchingScheduler] = None,
                   num_inference_steps: Optional[int] = None,
                   guidance_scale: float = 4.0,
                   generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                   seed: Optional[int] = None, vae: Optional[nn.Module] = None,
                   show_progress: bool = True, batch_size: Optional[int] = None) -> Tensor:
    """Sample latent videos ``[B, T, C, H, W]`` for the conditions ``text [B, L, D]`` (decoded
    through ``vae.decode_scaled`` (or ``vae.decode``) when ``vae`` is given).

    ``height``/``width``/``num_frames`` are latent sizes. ``null_text`` is ``[1, L, D]`` or
    ``[B, L, D]`` (the same ``L`` and ``D`` as ``text``). ``num_inference_steps`` defaults to
    the scheduler's own count (25 without a scheduler). ``generator``: one ``torch.Generator``
    for the whole batch's noise, or a list of B, one per video (as diffusers takes them: video
    i is then the one its generator gives alone); ``seed`` builds a CPU generator when no
    ``generator`` is given. ``batch_size`` splits large batches. ``B = 0`` gives an empty
    result.
    """
    if scheduler is not None and not isinstance(scheduler, FlowMatchingScheduler):
        raise TypeError(f"generate_video: scheduler must be a FlowMatchingScheduler (the models "
                        f"predict flow-matching velocities), got {type(scheduler).__name__}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"generate_video: guidance_scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):  # nan / inf gave all-NaN videos without a word
        raise ValueError(f"generate_video: guidance_scale must be finite, got {guidance_scale!r}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"generate_video: batch_size must be an int or None, got {batch_size!r}")
        batch_size = int(batch_size)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"generate_video: seed must be an int, got {seed!r}")
    gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if not (generator is None or isinstance(generator, torch.Generator) or (
            gens is not None and all(isinstance(g, torch.Generator) for g in gens))):
        raise TypeError(f"generate_video: generator must be a torch.Generator, a list of them "
                        f"(one per video) or None, got {generator!r}")
    for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"generate_video: {name} must be an int >= 1 (latent size), got {v!r}")
    if num_inference_steps is None:
        num_inference_steps = scheduler.num_inference_steps if scheduler is not None else 25
    scheduler = scheduler or FlowMatchingScheduler(num_inference_steps)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    channels = channels or model.config.in_channels
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, emb in (("text", text), ("null_text", null_text)):
        if not isinstance(emb, Tensor) or emb.dim() != 3:
            raise ValueError(f"{name} must be a [B, L, D] tensor, got "
                             f"{tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__}")
    B = text.shape[0]
    if null_text.shape[0] not in (1, B) or null_text.shape[1:] != text.shape[1:]:
        raise ValueError(f"null_text must be [1, L, D] or [B, L, D] with text's B, L, D = "
                         f"{tuple(text.shape)}, got {tuple(null_text.shape)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"generate_video: batch_size must be >= 1 or None, got {batch_size}")
    text = text.to(device, dtype)
    null_text = null_text.to(device, dtype)
    if null_text.shape[0] == 1:
        null_text = null_text.expand(B, -1, -1)
    # noise drawn on the generator's device (a seed: a CPU generator, so that seeds give the
    # same videos on every device; a CUDA generator draws on its GPU)
    shape = (num_frames, channels, height, width)
    if gens is not None:
        if len(gens) != B:
            raise ValueError(f"generate_video: a list of generators needs one per video, B={B} "
                             f"(text's batch), got {len(gens)}")
        x = torch.stack([torch.randn(shape, generator=g, device=g.device).to(device, dtype)
                         for g in gens]) if gens else torch.empty((0, *shape), device=device,
                                                                      dtype=dtype)
    else:
        x = torch.randn((B, *shape), generator=generator,
                        device=generator.device if generator is not None else "cpu").to(device, dtype)
    ts = scheduler.timesteps(num_inference_steps, device=device)
    if B == 0:
        num_inference_steps = 0
    bs = batch_size or max(B, 1)
    bar = progress(total=num_inference_steps, desc="sampling", disable=not show_progress)
    for i in range(num_inference_steps):
        t, t_next = ts[i], ts[i + 1]
        outs = []
        for s in range(0, B, bs):
            xs, cs, ns = x[s:s + bs], text[s:s + bs], null_text[s:s + bs]
            if guidance_scale == 1.0:
                outs.append(model(xs, t.expand(xs.shape[0]), cs))
                continue
            v = model(torch.cat([xs, xs]), t.expand(2 * xs.shape[0]), torch.cat([cs, ns]))
            v_c, v_u = v.chunk(2)
            outs.append(v_u + guidance_scale * (v_c - v_u))
        x = scheduler.step(torch.cat(outs), t, t_next, x)
        bar.update(1)
    bar.close()
    if vae is not None:
        decode = getattr(vae, "decode_scaled", vae.decode)
        x = torch.cat([decode(x[s:s + bs]) for s in range(0, B, bs)]) if B else decode(x)
    return x


@torch.no_grad()
def generate_image(model: nn.Module, text: Tensor, null_text: Tensor, *, height: int, width: int,
                   **kwargs) -> Tensor:
    """One-frame :func:`generate_video` -> ``[B, C, H, W]``."""
    return generate_video(model, text, null_text, num_frames=1, height=height, width=width, **kwargs)[:, 0]
