"""End-to-end benchmark of ``vidgen_kernels.integrations.diffusers``: the diffusers transformer
forward, unpatched vs patched (``apply(model)``), random weights (no downloads).

Run::

    python -m pytest benchmarks/test_bench_diffusers.py --benchmark-json /tmp/d.json   # full
    python -m pytest benchmarks/test_bench_diffusers.py --quick                        # smoke

Skipped (with the reason) when diffusers is not installed.

Cases: model x size x device x contender, forward only (``torch.no_grad``), batch 1, one
denoising step's transformer call. Contenders:

* ``diffusers``: the model as diffusers builds it (SDPA, eager RoPE and AdaLN);
* ``patched``: after ``vidgen_kernels.integrations.diffusers.apply(model)`` (the default backend:
  ``cpu`` on CPU, the GPU order on CUDA);
* ``torch.compile``: ``torch.compile(model)`` of the unpatched model (what a diffusers user
  compiles instead), and ``patched+torch.compile``: ``torch.compile`` of the patched model (our
  ops are custom ops inside the compiled graph): whether patching still pays once a model is
  compiled. Compiled and warmed up outside the timed region (``compile_s``); skipped under
  ``--quick``; on CUDA at full size for Wan-1.3B only (``COMPILE_LABELS_CUDA``).

Sizes:

* CPU, fp32: 2-layer models, hidden 256 (4 heads x 64), 16 text tokens (CogVideoX; Wan: 16
  cross-attention text tokens), latent ``4 x 32 x 32`` -> ``4 x 16 x 16`` = 1,024 video tokens.
  ``--quick``: latent ``2 x 16 x 16`` -> 128 video tokens.
* CUDA, bf16 (full layer counts and widths): CogVideoX-2B (30 layers, 30 x 64, sin-cos position
  embedding, no RoPE), CogVideoX-5B (42 layers, 48 x 64, RoPE), 226 text + ``13 x 30 x 45`` video
  tokens; Wan2.1-1.3B (30 layers, 12 x 128, FFN 8960), 512 text tokens, ``21 x 30 x 52`` video
  tokens. ``--quick``: the same widths with 2 layers and ``4 x 16 x 16`` latents.

Before timing, the patched output is compared with the unpatched one (``max_rel_err`` in
``extra_info``, tolerance of the dtype). The patched case records ``speedup`` = unpatched median /
patched median of the same run, and on CPU (and in ``--quick`` runs) ``paired_vs_diffusers``: the
median of ``t_unpatched / t_patched`` over 6 interleaved pairs against an unpatched twin of the
model (same seed, same weights; ``common.paired_speedup``), the steadier figure on a shared VM
where two separately timed medians drift by up to 30 %. (Not at the full GPU sizes: a second
5B model and its pairs would take minutes of the lent GPU's time.)
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import common

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed "
                                "(pip install 'vidgen-kernels[diffusers]')")

UNPATCHED, PATCHED = "diffusers", "patched"
COMPILE, PATCHED_COMPILE = common.COMPILE, "patched+torch.compile"
CONTENDERS = (UNPATCHED, PATCHED, COMPILE, PATCHED_COMPILE)

# label -> (family, model config, latent (F, H, W) after the VAE, text tokens)
_COG_SMALL = dict(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                  time_embed_dim=128, text_embed_dim=64, num_layers=2, sample_width=32,
                  sample_height=32, sample_frames=13, max_text_seq_length=16,
                  use_rotary_positional_embeddings=True)
_WAN_SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64,
                  in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=1024,
                  num_layers=2, cross_attn_norm=True)
_COG_2B = dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, time_embed_dim=512,
               text_embed_dim=4096, use_rotary_positional_embeddings=False)
_COG_5B = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512,
               text_embed_dim=4096, use_rotary_positional_embeddings=True)
_WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True)
SHAPES = {
    ("cpu", False): (("cogvideox-small", "cogvideox", _COG_SMALL, (4, 32, 32), 16),
                     ("wan-small", "wan", _WAN_SMALL, (4, 32, 32), 16)),
    ("cpu", True): (("cogvideox-small", "cogvideox", _COG_SMALL, (2, 16, 16), 16),
                    ("wan-small", "wan", _WAN_SMALL, (2, 16, 16), 16)),
    ("cuda", False): (("cogvideox-2b", "cogvideox", _COG_2B, (13, 60, 90), 226),
                      ("cogvideox-5b", "cogvideox", _COG_5B, (13, 60, 90), 226),
                      ("wan-1.3b", "wan", _WAN_13B, (21, 60, 104), 512)),
    ("cuda", True): (("cogvideox-5b-2layers", "cogvideox", dict(_COG_5B, num_layers=2),
                      (4, 32, 32), 226),
                     ("wan-1.3b-2layers", "wan", dict(_WAN_13B, num_layers=2), (4, 32, 32), 512)),
}


@dataclass(frozen=True)
class Case:
    shape: tuple
    device: str
    dtype: torch.dtype
    contender: str

    @property
    def label(self):
        return self.shape[0]

    @property
    def group(self):
        f, h, w = self.shape[3]
        return (f"diffusers fwd {self.label} latent={f}x{h}x{w} text={self.shape[4]} "
                f"{common.dtype_name(self.dtype)} {self.device}")

    @property
    def id(self):
        f, h, w = self.shape[3]
        return (f"diffusers-fwd-{self.label}-{f}x{h}x{w}-{common.dtype_name(self.dtype)}-"
                f"{self.device}-{self.contender}")


# CUDA, full sizes: the compiled contenders on Wan-1.3B only (compiling a 30-42 layer model
# whole takes minutes of the lent GPU's time each; the CPU's small models take seconds)
COMPILE_LABELS_CUDA = ("wan-1.3b",)


def _contenders(shape, device, quick):
    if device == "cuda" and not quick and shape[0] not in COMPILE_LABELS_CUDA:
        return (UNPATCHED, PATCHED)
    return CONTENDERS


def make_cases(quick, devices):
    return [Case(s, dev, common.DTYPES[dev], c) for dev in devices for s in SHAPES[(dev, quick)]
            for c in _contenders(s, dev, quick)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def build(case: Case):
    """(model, call) for the case; the model has random weights, in the case's dtype/device;
    ``call()`` runs the model on the case's inputs, ``call(m)`` runs ``m`` (a compiled model) on
    them."""
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
    label, family, cfg, (f, h, w), text = case.shape
    torch.manual_seed(0)
    g = torch.Generator(device=case.device).manual_seed(1)
    dev, dt = case.device, case.dtype
    with torch.device(dev):
        if family == "cogvideox":
            cfg = dict(cfg, max_text_seq_length=text)
            model = CogVideoXTransformer3DModel(**cfg)
        else:
            model = WanTransformer3DModel(**cfg)
    model = model.to(dt).eval()
    c_in = cfg.get("in_channels", 16)
    t = torch.tensor([500], device=dev)
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        p = cfg.get("patch_size", 2)
        x = torch.randn(1, f, c_in, h, w, device=dev, dtype=dt, generator=g)
        e = torch.randn(1, text, cfg["text_embed_dim"], device=dev, dtype=dt, generator=g)
        kw = {}
        if cfg.get("use_rotary_positional_embeddings"):
            kw["image_rotary_emb"] = get_3d_rotary_pos_embed(
                cfg["attention_head_dim"], ((0, 0), (h // p, w // p)), (h // p, w // p), f,
                device=dev)

        def call(m=model):
            return m(x, e, t, **kw, return_dict=False)[0]
    else:
        x = torch.randn(1, c_in, f, h, w, device=dev, dtype=dt, generator=g)
        e = torch.randn(1, text, cfg["text_dim"], device=dev, dtype=dt, generator=g)

        def call(m=model):
            return m(x, t, e, return_dict=False)[0]
    return model, call


_BASELINE: dict = {}


@torch.no_grad()
def test_diffusers_forward(benchmark, case: Case, request):
    benchmark.group = case.group
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU is visible")
    from vidgen_kernels.integrations import diffusers as vkd
    quick = request.config.getoption("--quick")
    if quick and case.contender in (COMPILE, PATCHED_COMPILE):
        pytest.skip("--quick: torch.compile contender skipped (compiling takes 20-60 s per case)")
    pol = common.heavy_policy(quick, case.device, max_rounds=30 if case.device == "cpu" else 10)
    if case.device == "cpu" and not quick:
        import dataclasses
        pol = dataclasses.replace(pol, min_rounds=5)
    model, call = build(case)
    info = {}
    key = case.group
    if key not in _BASELINE:  # the unpatched output, for the check and the speedup
        _BASELINE.clear()
        _BASELINE[key] = {"out": call().float()}
    if case.contender in (PATCHED, PATCHED_COMPILE):
        vkd.apply(model)
    compiled = None
    if case.contender in (COMPILE, PATCHED_COMPILE):
        compiled, info["compile_s"] = common.compile_contender(model, call, case.device)
        run = call
        call = lambda: run(compiled)  # noqa: E731
    if case.contender != UNPATCHED:
        out = call().float()
        want = _BASELINE[key]["out"]
        info["max_rel_err_vs_diffusers"] = common.assert_rel_err(
            case, [out], [want], "the unpatched model", 1 if case.dtype == torch.float32 else 4)
    median_s = common.measure(benchmark, request, call, case.device, pol, case.id, info)
    if case.contender == PATCHED and (case.device == "cpu" or quick):
        # vs an unpatched twin (same seed: same weights) in interleaved pairs
        twin, twin_call = build(case)
        twin_call()  # warm-up
        info.update(common.paired_speedup(call, twin_call, case.device, 1 if quick else 6,
                                          "paired_vs_diffusers"))
        del twin, twin_call
    if median_s:
        if case.contender == UNPATCHED:
            _BASELINE[key]["median_s"] = median_s
        elif "median_s" in _BASELINE[key]:
            info["speedup"] = _BASELINE[key]["median_s"] / median_s
    _, family, cfg, (f, h, w), text = case.shape
    info.update(op="diffusers", model=case.label, family=family, contender=case.contender,
                latent=[f, h, w],
                text=text, layers=cfg["num_layers"],
                heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
                dtype=common.dtype_name(case.dtype), device=case.device,
                device_name=common.device_name(case.device))
    benchmark.extra_info.update(info)
    del model, call, compiled
    common.release(case.device, case.contender in (COMPILE, PATCHED_COMPILE))
