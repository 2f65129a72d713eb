"""End-to-end benchmarks: one transformer block of the vidgen models, fused kernels vs reference.

Run::

    python -m pytest benchmarks/test_bench_block.py --benchmark-json /tmp/blk.json   # full
    python -m pytest benchmarks/test_bench_block.py --quick                          # smoke

Models (``vidgen.models``) built with ONE block (``depth`` / ``num_layers`` = 1; the patch
embedding, timestep embedding and final layer come with it, as in a real step):

* ``video_causal_dit``: ``VideoCausalDiT`` (spatial attention with 2D RoPE, causal temporal
  attention, cross-attention, temporal MoE FFN, AdaLN around each);
* ``cogvideox``: ``CogVideoXTransformer`` (text + video tokens, RoPE-3D attention, QK LayerNorm,
  LayerNormZero, modality experts).

Sizes: CPU hidden 512 (8 heads), latents ``[1, 4, 16, 32, 32]`` = 4 x 16 x 16 tokens after the
1x2x2 patch, 16 text tokens of width 512, fp32. CUDA bf16: hidden 1920 (CogVideoX-2B width,
30 heads) and 3072 (5B width, 48 heads) at CogVideoX's token count (latents
``[1, 13, 16, 60, 90]`` = 17,550 video tokens, 226 text tokens of width 4096 for CogVideoX).
``--quick``: hidden 128, latents ``[1, 2, 16, 16, 16]``.

Directions: ``infer`` (forward under ``torch.no_grad``) and ``train`` (forward + MSE loss vs a
fixed target + the gradients of every parameter; the input is a constant). Contenders: ``fused`` (the model
with the default backend choice: our kernels), ``reference`` (the same model and weights with
``backend="reference"``: pure PyTorch) and ``torch.compile`` (``torch.compile`` of the
reference model, compiled outside the timed region).

Paired speedups: in the ``fused`` and ``torch.compile`` cases the fused step and its peer (the
eager reference, the compiled reference) are also timed in interleaved pairs in one process
(``paired``): ``extra_info["paired_vs_reference"]`` / ``["paired_vs_compile"]``, the median of
``t_peer / t_fused`` over 8 pairs (CPU; 10 on CUDA). On the shared 2-core VM the same step
drifts by up to 30 % between runs; a pair sees the same machine state, so this ratio is the
steadier one, and ``summarize.py`` prints it under the table.

``extra_info``: ``activation_bytes`` = the activation memory kept for backward by one training
forward (``saved_tensors_hooks``: each distinct storage a saved tensor lives in, once, without
the parameters; the issue's "activation memory"), ``saved_bytes`` = the same saves counted per
tensor and per save (parameters included) and, on CUDA, for every contender and direction,
``peak_mem_bytes`` (``torch.cuda.max_memory_allocated`` during one step, model and inputs
included). The case's labels (model, direction, contender, sizes, dtype, device) are written
before the correctness check and the paired timing, so a row whose later step fails or skips
stays labelled.

Memory (CUDA): ``backend="reference"`` runs the pure-PyTorch attention
(``vidgen_kernels/ops/rope3d_attention.py`` ``_attend``): fp32 ``[B, heads, S, S]`` score
matrices. CogVideoX attends over all ``S = 226 + 13 * 30 * 45 = 17,776`` tokens at once: one
matrix is 35 GiB at hidden 1920 (30 heads) and 56.5 GiB at 3072 (48 heads), so the reference
does not fit an 80 GB card there. Before the reference (or ``torch.compile`` of it) runs on
CUDA, :func:`reference_peak_bytes` estimates its peak from the shapes (``REF_INFER_MATS`` /
``REF_TRAIN_MATS`` matrices of the largest / every attention layer, plus the other
activations) and the contender is skipped with the estimate and the free memory when it does
not fit. The ``fused`` rows then check their output against the reference at fewer frames
(same widths; ``check_latent`` in ``extra_info``; ``check_skipped`` when not even one frame
fits) and record ``paired_vs_reference_skipped`` instead of timing a peer that cannot run; a
peer that runs out of memory anyway leaves ``paired_vs_..._error``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import common

OP = "dit_block"
FUSED, REFERENCE, COMPILE = "fused", common.REFERENCE, common.COMPILE
MODELS = ("video_causal_dit", "cogvideox")
DIRECTIONS = ("infer", "train")
# (hidden, heads, latent [B, T, C, H, W], text tokens, text width)
SIZES = {
    ("cpu", False): ((512, 8, (1, 4, 16, 32, 32), 16, 512),),
    ("cpu", True): ((128, 4, (1, 2, 16, 16, 16), 8, 128),),
    ("cuda", False): ((1920, 30, (1, 13, 16, 60, 90), 226, 4096),
                      (3072, 48, (1, 13, 16, 60, 90), 226, 4096)),
    ("cuda", True): ((256, 4, (1, 4, 16, 32, 32), 16, 256),),
}
PATCH = (1, 2, 2)  # both models' default patch (build() keeps it): tokens = T * H/2 * W/2
GiB = common.GiB
# backend="reference" peak, in fp32 [B, heads, Sq, Sk] score matrices (conservative): inference
# holds z and one temporary (logsumexp) or the probabilities at once, 3 counted; a training step
# keeps the probabilities of every attention layer for backward and the backward makes 2-3 more
# of the largest, 5 counted per layer.
REF_INFER_MATS, REF_TRAIN_MATS = 3, 5
# the other activations, in [B, tokens, hidden] tensors of the case's dtype: the CPU runs'
# saved_tensors_hooks count ~21 (cogvideox) / ~36 (video_causal_dit) for a training forward
# (fused), a no-grad forward keeps a few alive at once (the FFN's 4x-wide hidden among them)
ACT_INFER, ACT_TRAIN = 8, 40


@dataclass(frozen=True)
class Case:
    model: str
    direction: str
    size: tuple
    device: str
    dtype: torch.dtype
    contender: str

    @property
    def group(self) -> str:
        hid, heads, lat, L, tw = self.size
        return (f"{OP} {self.model} {self.direction} hidden={hid} latent={'x'.join(map(str, lat))} "
                f"text={L} {common.dtype_name(self.dtype)} {self.device}")

    @property
    def id(self) -> str:
        hid, _, lat, L, _ = self.size
        return (f"{OP}-{self.model}-{self.direction}-h{hid}-{'x'.join(map(str, lat))}-"
                f"{common.dtype_name(self.dtype)}-{self.device}-{self.contender}")


def make_cases(quick: bool, devices) -> list[Case]:
    return [Case(m, d, s, dev, common.DTYPES[dev], c)
            for dev in devices for s in SIZES[(dev, quick)] for m in MODELS for d in DIRECTIONS
            for c in (FUSED, REFERENCE, COMPILE)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def _latent(case: Case, frames: Optional[int] = None) -> tuple:
    lat = case.size[2]
    return lat if frames is None else (lat[0], frames, *lat[2:])


def attention_matrix_bytes(case: Case, frames: Optional[int] = None) -> list[int]:
    """Bytes of one fp32 score matrix of each attention layer of the model under
    ``backend="reference"`` (at ``frames`` latent frames instead of the case's, if given)."""
    hid, heads, _, L, tw = case.size
    B, T, _, H, W = _latent(case, frames)
    hw = (H // PATCH[1]) * (W // PATCH[2])
    if case.model == "cogvideox":  # one joint attention over text + all video tokens
        return [B * heads * (L + T * hw) ** 2 * 4]
    # video_causal_dit: spatial attention within each frame, causal temporal attention across
    # the frames at each position, cross-attention of the video tokens to the text
    return [B * T * heads * hw * hw * 4, B * hw * heads * T * T * 4, B * heads * T * hw * L * 4]


def reference_peak_bytes(case: Case, frames: Optional[int] = None,
                         direction: Optional[str] = None) -> int:
    """Conservative estimate of the memory one step of the ``backend="reference"`` model (or of
    its ``torch.compile``, which still materialises the score matrices) allocates beyond the
    model and the inputs: see ``REF_INFER_MATS`` / ``REF_TRAIN_MATS`` / ``ACT_*``."""
    hid, heads, _, L, tw = case.size
    B, T, _, H, W = _latent(case, frames)
    tokens = B * (T * (H // PATCH[1]) * (W // PATCH[2]) + L)
    esz = torch.empty((), dtype=case.dtype).element_size()
    mats = attention_matrix_bytes(case, frames)
    if (direction or case.direction) == "infer":
        return REF_INFER_MATS * max(mats) + ACT_INFER * tokens * hid * esz
    return REF_TRAIN_MATS * sum(mats) + ACT_TRAIN * tokens * hid * esz


def no_room(what: str, need: int, device: str):
    """:func:`common.no_room` with this file's memory estimate named."""
    return common.no_room(what, need, device, "fp32 S x S score matrices + activations")


def peak_memory(step) -> int:
    """``torch.cuda.max_memory_allocated`` during one call of ``step`` (CUDA)."""
    common.synchronize("cuda")
    torch.cuda.reset_peak_memory_stats()
    step()
    common.synchronize("cuda")
    return torch.cuda.max_memory_allocated()


def build(case: Case) -> torch.nn.Module:
    from vidgen.models import CogVideoXTransformer, VideoCausalDiT
    hid, heads, lat, L, tw = case.size
    torch.manual_seed(0)
    if case.model == "video_causal_dit":
        m = VideoCausalDiT(in_channels=lat[2], hidden_size=hid, depth=1, num_heads=heads, text_dim=tw)
    else:
        from vidgen.models.cogvideox import CogVideoXConfig
        m = CogVideoXTransformer(CogVideoXConfig(in_channels=lat[2], hidden_size=hid, num_heads=heads,
                                                 num_layers=1, text_hidden_size=tw,
                                                 num_text_experts=1, num_video_experts=1))
    # AdaLN-Zero gates start at 0 (every block an identity): give them values so the whole
    # block is exercised.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1 and not p.abs().sum():
                p.normal_(0, 0.02)
    return m.to(case.device, case.dtype)


def make_inputs(case: Case, frames: Optional[int] = None) -> dict:
    """Inputs of the case (at ``frames`` latent frames instead of the case's, if given)."""
    hid, heads, _, L, tw = case.size
    lat = _latent(case, frames)
    g = torch.Generator(device=case.device).manual_seed(1)
    kw = dict(device=case.device, dtype=case.dtype, generator=g)
    # t from the same generator (it drew from the global RNG: every call got other timesteps)
    return {"x": torch.randn(*lat, **kw), "t": torch.rand(lat[0], device=case.device, generator=g),
            "text": torch.randn(lat[0], L, tw, **kw), "target": torch.randn(*lat, **kw)}


def step_fn(case: Case, model, inp: dict):
    if case.direction == "infer":
        def run():
            with torch.no_grad():
                return model(inp["x"], inp["t"], inp["text"])
        return run
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        out = model(inp["x"], inp["t"], inp["text"])
        loss = torch.nn.functional.mse_loss(out.float(), inp["target"].float())
        return torch.autograd.grad(loss, params)
    return run


def paired(case: Case, model, run_model, inp: dict, quick: bool, key: Optional[str] = None) -> dict:
    """The fused model's speedup over a peer timed in interleaved pairs in this process
    (``common.paired_speedup``): in the ``fused`` case over the eager reference (the same module
    with ``backend="reference"``), in the ``torch.compile`` case over the compiled reference.
    Keys ``paired_vs_reference`` / ``paired_vs_compile`` (or ``key``: median of
    ``t_peer / t_fused``), ``..._min``, ``..._max``, ``paired_pairs``."""
    pairs = 1 if quick else (10 if case.device == "cuda" else 8)
    fused_step = step_fn(case, model, inp)
    peer_step = step_fn(case, run_model, inp)

    def ours():
        model.backend = None
        return fused_step()

    def peer():
        model.backend = "reference"
        return peer_step()
    key = key or ("paired_vs_reference" if case.contender == FUSED else "paired_vs_compile")
    try:
        return common.paired_speedup(ours, peer, case.device, pairs, key)
    finally:
        model.backend = None if case.contender == FUSED else "reference"


FEWER = "paired_vs_reference_at_fewer_frames"


def paired_at_fewer_frames(case: Case, model, quick: bool) -> dict:
    """Where the eager reference step does not fit at the case's frame count (CogVideoX at its
    17,776 tokens: an fp32 ``[B, heads, S, S]`` score matrix per layer, 106-287 GiB), the fused
    vs reference pairs at the largest of half, a quarter ... of the frames whose reference step
    (this direction) fits: same widths, heads and text, a shorter sequence, so attention weighs
    less than at full size (the ratio understates the full-size one for full attention). Keys
    ``paired_vs_reference_at_fewer_frames`` (+ ``_min`` / ``_max`` / ``_reps``),
    ``paired_latent`` (the latent used) or ``..._skipped`` / ``..._error``."""
    frames, why = fitting_frames(case, case.size[2][1] // 2, case.direction,
                                 "the eager reference peer")
    if frames is None:
        return {FEWER + "_skipped": why}
    out = {"paired_latent": list(_latent(case, frames))}
    try:
        out.update(paired(case, model, model, make_inputs(case, frames), quick, key=FEWER))
    except torch.OutOfMemoryError as e:  # the estimate was short: a missing figure, no failure
        out[FEWER + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if FEWER + "_error" in out:
        common.free_after_oom(case.device)
    return out


def fitting_frames(case: Case, frames: int, direction: str, what: str
                   ) -> tuple[Optional[int], Optional[str]]:
    """(latent frames, None) or (None, why not even one fits): ``frames``, else half, a quarter
    ... of it, the first at which a reference step in ``direction`` fits the free memory
    (``what`` names the step in the reason)."""
    why = f"{what}: no frame count to try ({frames})"
    while frames >= 1:
        why = no_room(f"{what} at {frames} frame(s)", reference_peak_bytes(case, frames, direction),
                      case.device)
        if why is None:
            return frames, None
        frames //= 2
    return None, why


def check_frames(case: Case) -> tuple[Optional[int], Optional[str]]:
    """(latent frames the reference check runs at, None) or (None, why not even one fits): the
    case's frame count, else half, a quarter ... of it, the first whose reference forward fits
    the free memory (always the case's on the CPU)."""
    return fitting_frames(case, case.size[2][1], "infer", "the reference check")


def check_vs_reference(case: Case, model) -> dict:
    """The fused model's output vs the reference's (the same module and weights with
    ``backend="reference"``), one forward under ``torch.no_grad``. On CUDA the reference runs at
    the case's frame count when it fits the free memory, else at half, a quarter ... of the
    frames (same widths, heads and text: the same kernels at a shorter sequence;
    ``check_latent``), and the check is skipped with a note (``check_skipped``) when not even
    one frame fits or the reference runs out of memory anyway. Returns the ``extra_info``
    entries (``max_rel_err_vs_reference``: max |fused - reference| / max |reference|)."""
    T = case.size[2][1]
    frames, why = check_frames(case)
    if frames is None:
        return {"check_skipped": why}
    inp = make_inputs(case, None if frames == T else frames)
    out = {} if frames == T else {"check_latent": list(_latent(case, frames))}
    oom = None
    try:
        with torch.no_grad():
            a = model(inp["x"], inp["t"], inp["text"]).float()
            model.backend = "reference"
            b = model(inp["x"], inp["t"], inp["text"]).float()
    except torch.OutOfMemoryError as e:  # the estimate was short: a missing check, not a failure
        oom = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        model.backend = None
    if oom is not None:
        common.free_after_oom(case.device)
        return {**out, "check_skipped": f"the reference ran out of memory: {oom}"}
    out["max_rel_err_vs_reference"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    return out


def test_dit_block(benchmark, case: Case, request):
    benchmark.group = case.group
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU is visible")
    pytest.importorskip("vidgen.models", reason="the vidgen package is not importable")
    quick = request.config.getoption("--quick")
    if quick and case.contender == COMPILE:
        pytest.skip("--quick: torch.compile contender skipped (compiling takes 10-60 s per case)")
    pol = common.heavy_policy(quick, case.device, max_rounds=20)
    model = build(case)
    model.backend = None if case.contender == FUSED else "reference"
    inp = make_inputs(case)
    if case.contender != FUSED:  # the eager reference, or torch.compile of it
        why = no_room(f"backend='reference' ({case.contender}, {case.direction})",
                      reference_peak_bytes(case), case.device)
        if why is not None:
            del model, inp
            common.release(case.device, False)
            pytest.skip(why)
    hid, heads, lat, L, tw = case.size
    # the labels first: a step after the timing that fails (the check, the paired timing)
    # still leaves a labelled row
    info = benchmark.extra_info
    info.update(op=OP, model=case.model, direction=case.direction, contender=case.contender,
                hidden=hid, heads=heads, latent=list(lat), text_tokens=L,
                dtype=common.dtype_name(case.dtype), device=case.device,
                device_name=common.device_name(case.device),
                backend=None if case.contender == FUSED else REFERENCE)
    run_model = model
    if case.contender == COMPILE:
        run_model, info["compile_s"] = common.compile_contender(
            model, lambda c: step_fn(case, c, inp)(), case.device)
    if case.direction == "train" and case.contender != COMPILE:
        # (saved_tensors_hooks see the eager modules' saves, not a compiled graph's: the
        # torch.compile row would show the eager reference's figure, so it is left blank)
        info.update(common.count_saved_bytes(lambda: model(inp["x"], inp["t"], inp["text"]),
                                             exclude=list(model.parameters())))
    if case.device == "cuda":
        info["peak_mem_bytes"] = peak_memory(step_fn(case, run_model, inp))
    call = step_fn(case, run_model, inp)
    common.measure(benchmark, request, call, case.device, pol, case.id, info)
    err_tol = None
    if case.contender == FUSED:  # the fused model must compute what the reference computes
        # (after the timing, asserted last: a failing check still records the timed row)
        info.update(check_vs_reference(case, model))
        err_tol = 1e-3 if case.dtype == torch.float32 else 5e-2
    if case.contender in (FUSED, COMPILE):
        key = "paired_vs_reference" if case.contender == FUSED else "paired_vs_compile"
        # the eager reference peer runs at the case's size (the compiled one passed the memory
        # gate at the top of this test)
        why = (no_room("the eager reference peer", reference_peak_bytes(case), case.device)
               if case.contender == FUSED else None)
        if why is not None:
            info[key + "_skipped"] = why
            if case.contender == FUSED:  # the same comparison at a length the reference takes
                info.update(paired_at_fewer_frames(case, model, quick))
        else:
            try:
                info.update(paired(case, model, run_model, inp, quick))
            except torch.OutOfMemoryError as e:  # the peer could not run: the row stays
                info[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if key + "_error" in info:
                common.free_after_oom(case.device)
    del call, run_model
    common.release(case.device, case.contender == COMPILE)
    if err_tol is not None and "max_rel_err_vs_reference" in info:
        assert info["max_rel_err_vs_reference"] <= err_tol, info["max_rel_err_vs_reference"]
