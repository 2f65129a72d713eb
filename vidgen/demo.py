"""The vidgen demo: train a small video VAE and a latent video DiT on synthetic moving-object
videos (direction = condition), then sample with classifier-free guidance and measure the
direction accuracy.

    python -m vidgen demo [--steps N] [--vae-steps N] [--seed S] [--out DIR] [--device cpu|cuda] [--tiny]

Runs on the CPU unless ``--device cuda`` is given. Writes ``OUT/demo.gif`` (one row per
direction), ``OUT/frames.png`` (every frame of the first sample of each direction),
``OUT/loss.png``, the EMA weights ``OUT/dit_ema.safetensors`` (``dit_ema.pt`` where safetensors
is missing) and ``OUT/report.md``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

import vidgen_kernels as vk

from .media import plot_lines, write_gif, write_png
from .models import LatentVideoDiT, LatentVideoDiTConfig, SmallVideoVAE
from .pipelines import generate_video
from .schedulers import FlowMatchingScheduler
from .training import EMA, cfg_dropout, flow_matching_loss, make_optimizer, progress, save_checkpoint

DIRECTIONS = ("right", "left", "down", "up")
_DXY = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}  # (dx, dy) per frame, y grows downwards


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def moving_object_videos(n: int, frames: int = 8, size: int = 32, speed: int = 2,
                         generator: torch.Generator = None, directions: torch.Tensor = None,
                         start: str = "random"):
    """``n`` videos ``[n, frames, 1, size, size]`` in [-1, 1]: a bright square (side 5..8,
    brightness 0.6..1) on black moving ``speed`` px/frame right, left, down or up.
    ``start``: ``"random"``: the path lies anywhere it fits; ``"edge"``: the path is pinned along
    the motion axis, 2 px from the left/top edge (right/down movers start there, left/up movers
    end there); the position across the motion stays random (less diversity to learn).
    Returns ``(videos, directions [n] in 0..3)``."""
    if start not in ("random", "edge"):
        raise ValueError(f"start must be 'random' or 'edge', got {start!r}")
    g = generator
    if directions is None:
        directions = torch.randint(0, 4, (n,), generator=g)
    travel = speed * (frames - 1)
    vids = torch.zeros(n, frames, 1, size, size)
    for i in range(n):
        d = int(directions[i])
        s = int(torch.randint(5, 9, (1,), generator=g))
        b = 0.6 + 0.4 * float(torch.rand(1, generator=g))
        dx, dy = _DXY[d]
        lim_move, lim_fix = size - s - travel, size - s
        # start="edge": the path is pinned 2 px from the left/top edge (less diversity)
        a = int(torch.randint(0, lim_move + 1, (1,), generator=g)) if start == "random" else min(2, lim_move)
        c = int(torch.randint(0, lim_fix + 1, (1,), generator=g))
        for t in range(frames):
            if dx:
                x = a + t * speed if dx > 0 else a + travel - t * speed
                y = c
            else:
                y = a + t * speed if dy > 0 else a + travel - t * speed
                x = c
            vids[i, t, 0, y:y + s, x:x + s] = b
    return vids * 2 - 1, directions


def measure_directions(videos: torch.Tensor) -> torch.Tensor:
    """Direction (0..3) of each video ``[B, T, C, H, W]`` in [-1, 1] from its brightness
    centroid: least-squares slope of the centroid over frames, dominant axis and sign."""
    x = ((videos.float().mean(2) + 1) / 2).clamp(0, 1)           # [B, T, H, W] in [0, 1]
    w = (x - 0.25).clamp(min=0) + 1e-8                            # ignore dim background noise
    B, T, H, W = w.shape
    ys = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W)
    tot = w.sum((2, 3))
    cx, cy = (w * xs).sum((2, 3)) / tot, (w * ys).sum((2, 3)) / tot  # [B, T]
    tt = torch.arange(T, dtype=torch.float32) - (T - 1) / 2
    vx, vy = (cx * tt).sum(1) / tt.square().sum(), (cy * tt).sum(1) / tt.square().sum()
    horiz = vx.abs() >= vy.abs()
    return torch.where(horiz, torch.where(vx > 0, 0, 1), torch.where(vy > 0, 2, 3))


def condition_embeddings(text_dim: int, tokens: int = 2, seed: int = 1234):
    """Frozen 'text encoder': a fixed random embedding ``[tokens, text_dim]`` per direction,
    and the null (unconditional) embedding of zeros. Returns ``(cond [4, L, D], null [1, L, D])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, tokens, text_dim, generator=g), torch.zeros(1, tokens, text_dim)


# ---------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    steps: int = 2400          # DiT training steps
    vae_steps: int = 150
    batch: int = 16            # videos per DiT step
    vae_batch: int = 4
    vae_channels: int = 16
    frames: int = 8
    size: int = 32
    hidden: int = 96
    depth: int = 4
    heads: int = 4
    patch: tuple = (2, 2, 2)   # 8 latent frames x 8 x 8 -> 4 x 4 x 4 = 64 tokens per video
    start: str = "random"      # object start position: "random" or "edge" (see moving_object_videos)
    causal_temporal: bool = False  # True: the seed design's frame-causal temporal attention (--set causal_temporal=1)
    shift: float = 6.0         # flow-matching timestep shift (training and sampling): more weight on high noise
    text_dim: int = 32
    lr: float = 2e-3
    vae_lr: float = 3e-3
    samples_per_direction: int = 16
    sample_steps: int = 20
    guidance: float = 4.0
    ema_decay: float = 0.99
    cfg_drop: float = 0.1
    grad_clip: float = 1.0
    timing_rounds: int = 3


TINY = dict(patch=(1, 2, 2), steps=6, vae_steps=4, batch=4, vae_batch=2, vae_channels=8, hidden=32, depth=1, heads=2, frames=4, size=16,
            samples_per_direction=1, sample_steps=2, timing_rounds=1)


_AT_LEAST_1 = ("batch", "vae_batch", "vae_channels", "frames", "size", "hidden", "depth", "heads",
               "text_dim", "samples_per_direction", "sample_steps", "timing_rounds")
_POSITIVE = ("shift", "lr", "vae_lr", "grad_clip")  # > 0 (grad_clip <= 0 flipped or zeroed grads)
_MAY_BE_INF = ("grad_clip",)  # inf: no clipping
_UNIT = ("ema_decay", "cfg_drop")  # in [0, 1]
_STARTS = ("random", "edge")  # moving_object_videos(start=)


def check_config(cfg: DemoConfig) -> None:
    """Every setting in range before any work (a bad one used to fail after minutes of training,
    or to run to the end wrong: grad_clip=-1 trained by gradient ascent); ValueError naming it."""
    def bad(name, want):
        raise ValueError(f"{name} must be {want}, got {getattr(cfg, name)!r}")
    for name in ("steps", "vae_steps"):
        if getattr(cfg, name) < 0:
            bad(name, ">= 0")
    for name in _AT_LEAST_1:
        if getattr(cfg, name) < 1:
            bad(name, ">= 1")
    for name in _POSITIVE:
        v, finite = getattr(cfg, name), name not in _MAY_BE_INF
        if not v > 0 or (finite and not math.isfinite(v)):
            bad(name, "> 0" + (" and finite" if finite else ""))
    for name in _UNIT:
        if not 0 <= getattr(cfg, name) <= 1:
            bad(name, "in [0, 1]")
    if not math.isfinite(cfg.guidance):
        bad("guidance", "finite")
    if len(cfg.patch) != 3 or any(p < 1 for p in cfg.patch):
        bad("patch", "three ints >= 1 (t,h,w)")
    if cfg.start not in _STARTS:
        bad("start", f"one of {_STARTS}")
    fit = 8 + 2 * (cfg.frames - 1)  # the largest square (8 px) and its path (2 px per frame)
    if cfg.size < fit:
        bad("size", f">= {fit} for {cfg.frames} frames (an 8-px square moving 2 px per frame)")
    down = 4  # SmallVideoVAE(num_down=2)
    if cfg.size % down or (cfg.size // down) % cfg.patch[1] or (cfg.size // down) % cfg.patch[2]:
        bad("size", f"a multiple of {down} (the VAE) whose latent size size/{down} the patch's "
                    f"h, w = {cfg.patch[1:]} divide")
    if cfg.frames % cfg.patch[0]:
        bad("frames", f"a multiple of the patch's t = {cfg.patch[0]}")
    with torch.device("meta"):  # the model's own checks (hidden / heads, head_dim, ...), no memory
        LatentVideoDiT(LatentVideoDiTConfig(in_channels=4, patch_size=cfg.patch, hidden_size=cfg.hidden,
                                            depth=cfg.depth, num_heads=cfg.heads, text_dim=cfg.text_dim,
                                            causal_temporal=cfg.causal_temporal))


def make_config(tiny: bool = False, steps: int = None, vae_steps: int = None,
                overrides: dict = None) -> DemoConfig:
    """The demo's settings: defaults (or ``TINY``), then ``steps`` / ``vae_steps``, then
    ``overrides`` (``--set``, which win), checked by :func:`check_config`."""
    cfg = DemoConfig(**(TINY if tiny else {}))
    if steps is not None:
        cfg.steps = steps
    if vae_steps is not None:
        cfg.vae_steps = vae_steps
    for k, v in (overrides or {}).items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown demo setting {k!r}")
        setattr(cfg, k, type(getattr(cfg, k))(v) if not isinstance(getattr(cfg, k), (tuple, bool)) else v)
    check_config(cfg)
    return cfg


def _to_uint8(v: torch.Tensor) -> np.ndarray:
    return ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_train_step(model, lat, text, sched, rounds: int, backend, tick=lambda: None):
    """Median seconds of ``rounds`` fwd+bwd steps after one warm-up step (``tick()`` after each)."""
    m = copy.deepcopy(model).train().requires_grad_(True)
    m.backend = backend
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(rounds + 1):  # first round: warm-up
        t0 = time.perf_counter()
        loss = flow_matching_loss(m, lat, text, sched, generator=g)
        loss.backward()
        _sync(lat.device)
        times.append(time.perf_counter() - t0)
        m.zero_grad(set_to_none=True)
        tick()
    return float(np.median(times[1:]))


def _time_sampling(model, cond, null, cfg: DemoConfig, shape, backend, tick=lambda: None):
    """Median seconds of ``cfg.timing_rounds`` sampling calls (``cond``'s videos,
    ``cfg.sample_steps`` steps with CFG) after one warm-up call, as :func:`_time_train_step`
    does (the first call was measured up to 10x slower: 1.9 s vs 0.2 s warm, and it was all
    the report showed). ``tick()`` after each call."""
    m = copy.deepcopy(model)
    m.backend = backend
    times = []
    for i in range(cfg.timing_rounds + 1):  # first call: warm-up
        t0 = time.perf_counter()
        generate_video(m, cond, null, num_frames=shape[0], height=shape[1], width=shape[2],
                       num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance, seed=0,
                       show_progress=False)
        _sync(cond.device)
        times.append(time.perf_counter() - t0)
        tick()
    return float(np.median(times[1:]))


def _backends_text(backends: dict) -> str:
    """``vidgen_kernels.resolved_backends``'s dict as report text."""
    return ", ".join(f"{name} `{be}`" for name, be in backends.items()) + \
        " (the DiT runs AdaLN and the two attentions)"


def _cpu_busy_fraction(window_s: float = 0.5) -> float:
    """Fraction of all CPU time spent busy over the next ``window_s`` seconds (Linux
    ``/proc/stat``), i.e. what other processes use right now; falls back to the 1-minute load
    average per core elsewhere (a lagging measure)."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = ticks()
        time.sleep(window_s)
        t1, i1 = ticks()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] / (os.cpu_count() or 1)
        except OSError:
            return 0.0


def _auto_threads() -> int:
    """1 thread when other processes keep the CPU more than half busy right now (OpenMP threads
    that get descheduled make a 2-thread run 5-10x slower on a loaded 2-core machine), else
    torch's default."""
    return 1 if _cpu_busy_fraction() > 0.5 else torch.get_num_threads()


def _loss_plot(path, vae_losses, dit_losses, smooth):
    """Loss curves with matplotlib when installed, else the built-in rasteriser (no labels)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, plot_lines([[(smooth(vae_losses, max(1, len(vae_losses) // 50)), (200, 60, 30))],
                                    [(smooth(dit_losses), (30, 80, 200))]]))
        return "built-in rasteriser (left VAE, right DiT; log y)"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, losses, title in ((axes[0], vae_losses, "VAE (MSE + KL)"), (axes[1], dit_losses, "DiT flow matching")):
        ax.plot(losses, alpha=0.3, lw=0.8, label="per step")
        k = max(1, len(losses) // 50)
        if len(losses) >= k:
            ax.plot(np.arange(k - 1, len(losses)), smooth(losses, k), lw=1.5, label=f"mean of {k}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def run_demo(out: str = "out", steps: int = None, seed: int = 0, device: str = "cpu", tiny: bool = False,
             vae_steps: int = None, quiet: bool = False, threads: int = 0, overrides: dict = None) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(threads if threads and threads > 0 else _auto_threads())
    cfg = make_config(tiny, steps, vae_steps, overrides)
    device = torch.device(device or "cpu")  # the CPU unless asked: the demo's sizes are a CPU's
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"vidgen demo: device={device}, threads={torch.get_num_threads()}, DiT steps={cfg.steps}, "
        f"VAE steps={cfg.vae_steps}, out={out}")

    # 1. VAE ----------------------------------------------------------------------------------
    vae = SmallVideoVAE(in_channels=1, latent_channels=4, base_channels=cfg.vae_channels, num_down=2).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae_losses = []
    t0 = time.perf_counter()
    bar = progress(range(cfg.vae_steps), desc="VAE", disable=quiet)
    for i in bar:
        x, _ = moving_object_videos(cfg.vae_batch, cfg.frames, cfg.size, generator=g, start=cfg.start)
        x = x.to(device)
        recon, mean, logvar = vae(x, generator=None)
        loss = vae.loss(x, recon, mean, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vae_losses.append(loss.item())
        bar.set_postfix_str(f"loss {loss.item():.4f}")
    vae_time = time.perf_counter() - t0
    vae.eval().requires_grad_(False)
    bar = progress(total=2, desc="VAE calibration", disable=quiet)  # 1: the videos, 2: encode + fit
    calib, _ = moving_object_videos(64 if not tiny else 8, cfg.frames, cfg.size, generator=g, start=cfg.start)
    bar.update(1)
    vae.fit_scaling_factor(calib.to(device))
    bar.set_postfix_str(f"scaling factor {float(vae.scaling_factor):.3f}")
    bar.update(1)
    bar.close()

    # 2. latent video DiT with flow matching + CFG dropout + EMA ------------------------------
    cond_emb, null_emb = condition_embeddings(cfg.text_dim)
    cond_emb, null_emb = cond_emb.to(device), null_emb.to(device)
    lat_hw = cfg.size // vae.downsample
    model = LatentVideoDiT(LatentVideoDiTConfig(in_channels=4, patch_size=cfg.patch, hidden_size=cfg.hidden,
                                                depth=cfg.depth, num_heads=cfg.heads, text_dim=cfg.text_dim,
                                                causal_temporal=cfg.causal_temporal)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, lr=cfg.lr)
    sched = FlowMatchingScheduler(cfg.sample_steps, shift=cfg.shift)
    warmup = max(1, cfg.steps // 20)
    lr_at = lambda i: cfg.lr * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * i / max(1, cfg.steps))))  # noqa: E731
    dit_losses = []
    t0 = time.perf_counter()
    bar = progress(range(cfg.steps), desc="DiT", disable=quiet)
    for i in bar:
        with torch.no_grad():
            x, d = moving_object_videos(cfg.batch, cfg.frames, cfg.size, generator=g, start=cfg.start)
            lat = vae.encode_scaled(x.to(device))
        text = cfg_dropout(cond_emb[d.to(device)], null_emb, cfg.cfg_drop, generator=None)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        loss = flow_matching_loss(model, lat, text, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        dit_losses.append(loss.item())
        bar.set_postfix_str(f"loss {loss.item():.4f}")
    dit_time = time.perf_counter() - t0
    ckpt = save_checkpoint(os.path.join(out, "dit_ema.safetensors"), ema.model,
                           config=vars(model.config))

    # 3. sample with CFG ------------------------------------------------------------------------
    n = cfg.samples_per_direction
    dirs = torch.arange(4).repeat_interleave(n)
    t0 = time.perf_counter()
    videos = generate_video(ema.model, cond_emb[dirs.to(device)], null_emb, num_frames=cfg.frames,
                            height=lat_hw, width=lat_hw, scheduler=sched,
                            num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                            seed=seed + 1, vae=vae, show_progress=not quiet).cpu()
    sample_time = time.perf_counter() - t0
    pred = measure_directions(videos)
    correct = (pred == dirs)
    acc = correct.float().mean().item()
    per_dir = {DIRECTIONS[k]: correct[dirs == k].float().mean().item() for k in range(4)}
    # sanity check of the metric on real data
    real, real_d = moving_object_videos(64 if not tiny else 8, cfg.frames, cfg.size, generator=g, start=cfg.start)
    metric_acc = (measure_directions(real) == real_d).float().mean().item()

    # 4. fused kernels vs backend="reference" timings ------------------------------------------
    with torch.no_grad():
        x, d = moving_object_videos(cfg.batch, cfg.frames, cfg.size, generator=g, start=cfg.start)
        lat = vae.encode_scaled(x.to(device))
    text = cond_emb[d.to(device)]
    timings = {}
    backends_used = vk.resolved_backends(device)
    t0 = time.perf_counter()
    # per backend: warm-up + timing_rounds train steps, then warm-up + timing_rounds sampling calls
    bar = progress(total=2 * 2 * (cfg.timing_rounds + 1), desc="timings", disable=quiet)
    tick = lambda: bar.update(1)  # noqa: E731
    for name, be in (("fused (default backend)", None), ("reference", "reference")):
        bar.set_postfix_str(f"{be or 'default'}: train step")
        step_s = _time_train_step(ema.model, lat, text, sched, cfg.timing_rounds, be, tick)
        bar.set_postfix_str(f"{be or 'default'}: sampling")
        timings[name] = (step_s, _time_sampling(ema.model, cond_emb, null_emb, cfg,
                                                (cfg.frames, lat_hw, lat_hw), be, tick))
    bar.close()
    timing_time = time.perf_counter() - t0

    # 5. files ---------------------------------------------------------------------------------
    u8 = _to_uint8(videos[:, :, 0])                                 # [4n, T, H, W]
    S, T = cfg.size, cfg.frames
    pad = 2
    cols = min(n, 8)
    grid_frames = np.zeros((T, 4 * (S + pad) + pad, cols * (S + pad) + pad), np.uint8) + 40
    for k in range(4):
        for j in range(cols):
            v = u8[k * n + j]
            grid_frames[:, pad + k * (S + pad): pad + k * (S + pad) + S, pad + j * (S + pad): pad + j * (S + pad) + S] = v
    scale = max(1, 128 // S)
    write_gif(os.path.join(out, "demo.gif"), grid_frames.repeat(scale, 1).repeat(scale, 2), duration_ms=150)
    strip = np.zeros((4 * (S + pad) + pad, T * (S + pad) + pad), np.uint8) + 40
    for k in range(4):
        for t in range(T):
            strip[pad + k * (S + pad): pad + k * (S + pad) + S, pad + t * (S + pad): pad + t * (S + pad) + S] = u8[k * n, t]
    write_png(os.path.join(out, "frames.png"), strip.repeat(scale, 0).repeat(scale, 1))

    def smooth(v, k=max(1, len(dit_losses) // 50)):
        v = np.asarray(v, float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) >= k else v

    _loss_plot(os.path.join(out, "loss.png"), vae_losses, dit_losses, smooth)
    total = time.perf_counter() - t_start
    fused_name = "fused (default backend)"
    lines = [
        "# vidgen demo report", "",
        f"**Direction accuracy: {acc * 100:.1f}%** ({int(correct.sum())}/{len(dirs)} generated videos move "
        "the conditioned way, measured from the brightness centroid's least-squares motion across frames).", "",
        "| direction | accuracy |", "|---|---|",
        *[f"| {k} | {v * 100:.0f}% |" for k, v in per_dir.items()], "",
        f"Metric sanity check on real training videos: {metric_acc * 100:.1f}%.", "",
        "## Timings", "",
        f"- total wall time: {total:.1f} s (VAE training {vae_time:.1f} s, DiT training {dit_time:.1f} s, "
        f"sampling {len(dirs)} videos {sample_time:.1f} s, the timings below {timing_time:.1f} s)",
        f"- DiT training: {cfg.steps} steps, {dit_time / max(1, cfg.steps) * 1000:.1f} ms/step (batch {cfg.batch}, "
        "incl. data, VAE encode, optimizer, EMA)", "",
        f"| backend | train step fwd+bwd (batch {cfg.batch}) | sampling 4 videos ({cfg.sample_steps} steps, CFG) |",
        "|---|---|---|",
        *[f"| {k} | {v[0] * 1000:.1f} ms | {v[1]:.2f} s |" for k, v in timings.items()],
        f"| ratio reference / fused | {timings['reference'][0] / timings[fused_name][0]:.2f}x | "
        f"{timings['reference'][1] / timings[fused_name][1]:.2f}x |", "",
        f"Each time is the median of {cfg.timing_rounds} call(s) after one warm-up call (a first call "
        "can be several times slower), per backend, on the EMA model; fused = the default backend, "
        "per op family as resolved under Set-up.", "",
        "## Set-up", "",
        f"- data: {cfg.frames} frames x {cfg.size}x{cfg.size} grey, a square moving 2 px/frame (start: {cfg.start}); condition = "
        f"direction (a fixed random {cfg.text_dim}-wide 2-token embedding per direction; null = zeros, "
        f"dropped {cfg.cfg_drop * 100:.0f}% of the time)",
        f"- VAE: SmallVideoVAE, {sum(p.numel() for p in vae.parameters()):,} params, {vae.downsample}x spatial, "
        f"4 latent channels, {cfg.vae_steps} steps; scaling factor {float(vae.scaling_factor):.3f}",
        f"- DiT: LatentVideoDiT hidden {cfg.hidden}, depth {cfg.depth}, heads {cfg.heads}, "
        f"{'causal' if cfg.causal_temporal else 'bidirectional'} temporal attention, patch {'x'.join(map(str, cfg.patch))}, "
        f"{n_params:,} params; flow matching, AdamW lr {cfg.lr} (warm-up + cosine), grad clip {cfg.grad_clip}, "
        f"EMA {cfg.ema_decay}; timestep shift {cfg.shift}; latents centred per channel and scaled; "
        f"sampling: Euler {cfg.sample_steps} steps, CFG scale {cfg.guidance}",
        f"- checkpoint: `{os.path.basename(ckpt)}` ({'safetensors' if ckpt.endswith('.safetensors') else 'torch.save: safetensors not installed'})",
        "- loss.png: left VAE loss, right DiT flow-matching loss (log y)",
        f"- device {device} ({torch.get_num_threads()} CPU threads); torch {torch.__version__}; vidgen_kernels {vk.__version__} "
        f"(backends available: {', '.join(vk.available_backends(device))}; default `{vk.current_backend()}`, "
        f"resolved per op family (float32): {_backends_text(backends_used)}; "
        f"{vk.extension_status()}); Python {platform.python_version()}; seed {seed}",
    ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    say("\n".join(lines))
    return {"accuracy": acc, "per_direction": per_dir, "wall_time": total, "timings": timings,
            "files": ["demo.gif", "frames.png", "loss.png", "report.md"]}


def _parse_setting(item: str):
    """``KEY=VALUE`` of ``--set`` -> ``(key, value)`` typed like the DemoConfig field (bools:
    true/false/1/0/yes/no; ``patch``: ``t,h,w``); ValueError naming what is wrong."""
    k, eq, v = item.partition("=")
    if not eq:
        raise ValueError("expected KEY=VALUE")
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    if k not in fields:
        raise ValueError(f"unknown setting {k!r} (settings: {', '.join(fields)})")
    default = getattr(DemoConfig, k)
    try:
        if isinstance(default, bool):
            if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            val = v.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            val = tuple(int(i) for i in v.split(","))
            if len(val) != len(default):
                raise ValueError
        else:
            val = type(default)(v)
    except ValueError:
        raise ValueError(f"{k} takes a value like {default!r}, got {v!r}") from None
    return k, val


def main(argv=None):
    p = argparse.ArgumentParser(prog="vidgen demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="DiT training steps (default 2400)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="cpu", help="cpu (default) / cuda")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny sizes)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: 1 when the machine is already loaded, else all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig field (e.g. --set hidden=64 --set patch=1,2,2)")
    a = p.parse_args(argv)
    for name in ("steps", "vae_steps", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.device is not None:
        try:
            dev = torch.device(a.device)
        except RuntimeError as e:
            p.error(f"--device {a.device!r}: {e}")
        mod = getattr(torch, dev.type, None)
        if dev.type != "cpu" and not (hasattr(mod, "is_available") and mod.is_available()):
            p.error(f"--device {a.device}: no {dev.type} device is available here (run on the CPU: "
                    "leave --device out or pass --device cpu)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file, not a folder")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {a.out}: cannot create the folder ({e})")
    overrides = {}
    for item in a.set:
        try:
            k, v = _parse_setting(item)
        except ValueError as e:
            p.error(f"--set {item}: {e}")
        overrides[k] = v
    try:
        make_config(a.tiny, a.steps, a.vae_steps, overrides)  # what run_demo will run
    except ValueError as e:
        p.error(f"setting {e}")
    res = run_demo(out=a.out, steps=a.steps, seed=a.seed, device=a.device, tiny=a.tiny,
                   vae_steps=a.vae_steps, quiet=a.quiet, threads=a.threads,
                   overrides=overrides)
    return 0 if res else 1


if __name__ == "__main__":
    raise SystemExit(main())
