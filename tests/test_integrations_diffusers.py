"""vidgen_kernels.integrations.diffusers: patched diffusers CogVideoX / Wan transformers match the
originals (outputs and gradients, fp32), remove() restores them bit for bit, torch.compile runs,
unsupported configurations are left unpatched with a warning."""
import functools
import subprocess
import sys
import warnings

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (pip install 'vidgen-kernels[diffusers]'); "
    "the diffusers integration tests need it")

from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

import vidgen_kernels as vk  # noqa: E402
from helpers import CUDA_MARKS, fake_gpus  # noqa: E402
from vidgen_kernels.integrations import diffusers as vkd  # noqa: E402
from vidgen_kernels.integrations.diffusers import (  # noqa: E402
    CogVideoXRoPE3DAttnProcessor, FusedAdaLayerNorm, FusedCogVideoXLayerNormZero,
    WanRoPE3DAttnProcessor)

BACKENDS = [b for b in ("cpu", "reference") if b in vk.available_backends(torch.device("cpu"))]
HEAD_DIM = 16


def _triton_interpreter_param():
    """``("triton", "cpu")``: the GPU kernels in Triton's interpreter (bf16 made GPU-faithful by
    ``interp_fixes``), skipped with the reason where that cannot run."""
    from helpers import interp_fixes_skip
    from vidgen_kernels.backends import why_unavailable
    why = why_unavailable("triton", "cpu") or interp_fixes_skip()
    marks = [pytest.mark.triton]
    if why:
        marks.append(pytest.mark.skip(reason=f"triton on cpu: {why}"))
    return pytest.param("triton", "cpu", id="triton-interpreter", marks=marks)


# (backend, device): the CPU backends, the Triton kernels in the interpreter, and on a GPU the
# automatic choice (cuda, then triton), marked ``cuda``; rtol of the fp32 comparisons per
# device (CUDA: SDPA in diffusers and our kernels reduce in other orders)
BACKEND_DEVICES = [pytest.param(b, "cpu", id=b) for b in BACKENDS] + [
    _triton_interpreter_param(), pytest.param(None, "cuda", id="auto-cuda", marks=CUDA_MARKS)]
RTOL = {"cpu": 1e-5, "cuda": 1e-4}


def to_device(args, kw, device):
    """Inputs of ``cog_inputs`` / ``wan_inputs`` moved to ``device`` (the RoPE tables too)."""
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(u) for u in v)
        return v
    return tuple(mv(a) for a in args), {k: mv(v) for k, v in kw.items()}


# ----------------------------------------------------------------------------------------------
# tiny models and inputs
# ----------------------------------------------------------------------------------------------
def cogvideox(rope=True, **kw):
    torch.manual_seed(0)
    cfg = dict(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
               time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
               sample_frames=9, patch_size=2, max_text_seq_length=4,
               use_rotary_positional_embeddings=rope)
    cfg.update(kw)
    return CogVideoXTransformer3DModel(**cfg)


def cog_inputs(rope):
    """Latents [B, F=3, C=4, 8, 8] -> 3 x 4 x 4 = 48 video tokens after 2x2 patches; 4 text
    tokens. rope: None, "int" (integer grid) or "frac" (fractional positions: a crop as
    CogVideoX 1.0's pipeline computes with get_resize_crop_region_for_grid)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g)
    e = torch.randn(2, 4, 16, generator=g)
    t = torch.tensor([10, 500])
    kw = {}
    if rope == "int":
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (4, 4)), (4, 4), 3)
    elif rope == "frac":
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(HEAD_DIM, ((0.5, 0.25), (5.0, 4.5)),
                                                         (4, 4), 3)
    return (x, e, t), kw


def wan(**kw):
    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HEAD_DIM,
               in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
               cross_attn_norm=True, rope_max_seq_len=32)
    cfg.update(kw)
    return WanTransformer3DModel(**cfg)


def wan_inputs(per_token=False, image=False):
    """Latents [B, C=4, F=3, 8, 8] -> 48 tokens; 5 text tokens. per_token: Wan 2.2 TI2V-style
    timestep [B, tokens]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (2, 48), generator=g) if per_token else torch.tensor([10, 500])
    e = torch.randn(2, 5, 16, generator=g)
    kw = {}
    if image:
        kw["encoder_hidden_states_image"] = torch.randn(2, 3, 16, generator=g)
    return (x, t, e), kw


def run(model, args, kw):
    return model(*args, **kw, return_dict=False)[0]


def close(actual, expected, rtol=1e-5):
    """Max abs error within rtol of the tensor's scale (elementwise rtol is meaningless near 0)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-7, f"max abs err {err:.3g} vs scale {scale:.3g}"


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def train_step(model, args, kw):
    model.zero_grad(set_to_none=True)
    out = run(model, args, kw)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), grads(model)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules()) + sum(
        isinstance(getattr(m, "processor", None), cls) for m in model.modules())


def no_warnings(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*a, **k)


# ----------------------------------------------------------------------------------------------
# CogVideoX
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("rope", [None, "int", "frac"])
def test_cogvideox_forward_and_grads_match(backend, device, rope):
    if backend == "triton" and rope != "frac":
        pytest.skip("Triton interpreter: the fractional-position table only (time)")
    model = cogvideox(rope=rope is not None).to(device).train()
    args, kw = to_device(*cog_inputs(rope), device)
    ref_out, ref_grads = train_step(model, args, kw)
    no_warnings(vkd.apply, model, backend=backend)
    assert vkd.is_patched(model)
    assert count(model, CogVideoXRoPE3DAttnProcessor) == 2
    assert count(model, FusedCogVideoXLayerNormZero) == 4
    assert count(model, FusedAdaLayerNorm) == 1
    assert all("forward" in b.__dict__ for b in model.transformer_blocks)  # fused residual
    out, g = train_step(model, args, kw)
    close(out, ref_out, rtol=RTOL[device])
    assert g.keys() == ref_grads.keys()
    for n in g:
        close(g[n], ref_grads[n], rtol=RTOL[device])


def test_cogvideox_remove_restores_exactly():
    model = cogvideox().eval()
    args, kw = cog_inputs("frac")
    procs = {n: p for n, p in model.attn_processors.items()}
    norms = [(b.norm1, b.norm2) for b in model.transformer_blocks]
    norm_out = model.norm_out
    with torch.no_grad():
        before = run(model, args, kw)
        vkd.apply(model)
        patched = run(model, args, kw)
        vkd.remove(model)
        after = run(model, args, kw)
    close(patched, before)
    assert torch.equal(before, after)
    assert not vkd.is_patched(model)
    assert all(model.attn_processors[n] is p for n, p in procs.items())
    assert [(b.norm1, b.norm2) for b in model.transformer_blocks] == norms
    assert model.norm_out is norm_out
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)
    vkd.remove(model)  # no-op when unpatched


def test_remove_after_fused_qkv_then_unfuse_restores_the_original_processors():
    """apply -> fuse_qkv_projections -> remove -> unfuse_qkv_projections: unfuse puts back the
    processors fuse saved, which were ours; it brought the patch back on an unpatched model
    (outputs still close, so only a processor count shows it). remove() now swaps the originals
    into that saved dict."""
    model = cogvideox().eval()
    args, kw = cog_inputs("int")
    procs = dict(model.attn_processors)
    with torch.no_grad():
        before = run(model, args, kw)
        vkd.apply(model, backend="cpu")
        model.fuse_qkv_projections()
        with pytest.warns(UserWarning, match="replaced after apply"):
            vkd.remove(model)
        model.unfuse_qkv_projections()
        after = run(model, args, kw)
    assert count(model, CogVideoXRoPE3DAttnProcessor) == 0
    assert all(model.attn_processors[n] is p for n, p in procs.items())
    assert torch.equal(before, after)


def test_cogvideox_parameters_dtype_device_unchanged():
    model = cogvideox()
    before = {k: (v.data_ptr(), v.dtype, v.device, v.shape) for k, v in model.state_dict().items()}
    vkd.apply(model)
    vkd.apply(model)  # idempotent
    after = {k: (v.data_ptr(), v.dtype, v.device, v.shape) for k, v in model.state_dict().items()}
    assert before == after
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in model.state_dict().items())


def test_cogvideox_fused_qkv_processor_left_unpatched_with_warning():
    model = cogvideox().eval()
    args, kw = cog_inputs("int")
    model.fuse_qkv_projections()
    with torch.no_grad():
        ref = run(model, args, kw)
        with pytest.warns(UserWarning, match=r"transformer_blocks\.0\.attn1.*FusedCogVideoXAttnProcessor2_0"):
            vkd.apply(model, backend="cpu")
        assert count(model, CogVideoXRoPE3DAttnProcessor) == 0
        assert count(model, FusedCogVideoXLayerNormZero) == 4  # the norms are still patched
        close(run(model, args, kw), ref)


def test_cogvideox_attention_mask_falls_back_to_original():
    model = cogvideox().eval()
    vkd.apply(model, backend="cpu")
    attn = model.transformer_blocks[0].attn1
    proc = attn.processor
    h, e = torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    mask = torch.ones(1, 9, dtype=torch.bool)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="attention_mask"):
            got = proc(attn, h, e, attention_mask=mask)
        want = proc.original(attn, h, e, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------------------------
# Wan
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2-per-token"])
def test_wan_forward_and_grads_match(backend, device, per_token, monkeypatch):
    """Each block's two inner sublayer boundaries (self-attention's gated residual + norm2,
    cross-attention's residual + norm3's modulation) run on gated_residual_adaln."""
    model = wan().to(device).train()
    args, kw = to_device(*wan_inputs(per_token), device)
    ref_out, ref_grads = train_step(model, args, kw)
    no_warnings(vkd.apply, model, backend=backend)
    assert count(model, WanRoPE3DAttnProcessor) == 4  # attn1 (RoPE) + attn2 (text) per block
    assert all("forward" in b.__dict__ for b in model.blocks)  # fused modulation
    calls = []
    orig = vk.gated_residual_adaln
    monkeypatch.setattr(vk, "gated_residual_adaln", lambda *a, **k: calls.append(1) or orig(*a, **k))
    out, g = train_step(model, args, kw)
    assert len(calls) == 2 * len(model.blocks)
    close(out, ref_out, rtol=RTOL[device])
    assert g.keys() == ref_grads.keys()
    for n in g:
        close(g[n], ref_grads[n], rtol=RTOL[device])


def test_wan_without_cross_attention_norm(monkeypatch):
    """``cross_attn_norm=False`` (norm2 is an nn.Identity): the self-attention residual stays
    eager, the cross-attention boundary is fused; outputs and gradients as unpatched."""
    model = wan(cross_attn_norm=False).train()
    args, kw = wan_inputs()
    ref_out, ref_grads = train_step(model, args, kw)
    no_warnings(vkd.apply, model)
    calls = []
    orig = vk.gated_residual_adaln
    monkeypatch.setattr(vk, "gated_residual_adaln", lambda *a, **k: calls.append(1) or orig(*a, **k))
    out, g = train_step(model, args, kw)
    assert len(calls) == len(model.blocks)
    close(out, ref_out, rtol=RTOL["cpu"])
    for n in g:
        close(g[n], ref_grads[n], rtol=RTOL["cpu"])


def test_wan_rotation_matches_diffusers_exactly_on_attn1():
    """The self-attention processor alone against WanAttnProcessor (interleaved pairs)."""
    model = wan().eval()
    x = torch.randn(1, 4, 3, 8, 8)
    rot = model.rope(x)
    attn = model.blocks[0].attn1
    h = torch.randn(2, 48, 32)
    with torch.no_grad():
        ref = attn(h, None, None, rot)
        vkd.apply(model, backend="reference")
        got = attn(h, None, None, rot)
    close(got, ref, rtol=2e-6)


def test_wan_remove_restores_exactly():
    model = wan().eval()
    args, kw = wan_inputs()
    with torch.no_grad():
        before = run(model, args, kw)
        vkd.apply(model)
        vkd.remove(model)
        after = run(model, args, kw)
    assert torch.equal(before, after)
    assert count(model, WanRoPE3DAttnProcessor) == 0
    assert all("forward" not in b.__dict__ and not hasattr(b, "_vidgen_kernels_backend")
               for b in model.blocks)


def test_wan_image_to_video_cross_attention_left_unpatched_with_warning():
    model = wan(image_dim=16, added_kv_proj_dim=32).eval()
    g = torch.Generator().manual_seed(1)
    # the I2V processor splits text and image by a hard-coded text length of 512
    args = (torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([10]),
            torch.randn(1, 512, 16, generator=g))
    kw = {"encoder_hidden_states_image": torch.randn(1, 3, 16, generator=g)}
    with torch.no_grad():
        ref = run(model, args, kw)
        with pytest.warns(UserWarning, match=r"blocks\.0\.attn2.*image-to-video"):
            vkd.apply(model, backend="cpu")
        assert count(model, WanRoPE3DAttnProcessor) == 2  # the two self-attentions
        close(run(model, args, kw), ref)


def test_wan_attention_backend_left_unpatched_with_warning():
    model = wan()
    model.blocks[1].attn1.processor._attention_backend = "native"
    with pytest.warns(UserWarning, match=r"blocks\.1\.attn1.*attention backend"):
        vkd.apply(model)
    assert count(model, WanRoPE3DAttnProcessor) == 3


def test_wan_fused_qkv_projections_match():
    model = wan().eval()
    model.fuse_qkv_projections()
    args, kw = wan_inputs()
    with torch.no_grad():
        ref = run(model, args, kw)
        no_warnings(vkd.apply, model, backend="cpu")
        assert count(model, WanRoPE3DAttnProcessor) == 4
        close(run(model, args, kw), ref)


def test_wan_attention_backend_set_after_apply_falls_back():
    model = wan().eval()
    args, kw = wan_inputs()
    with torch.no_grad():
        ref = run(model, args, kw)
        vkd.apply(model, backend="cpu")
        model.set_attention_backend("native")
        with pytest.warns(UserWarning, match="attention backend"):
            out = run(model, args, kw)
    close(out, ref)


def test_wan_attention_backend_context_falls_back(monkeypatch):
    """diffusers' ``attention_backend(...)`` context manager (the dispatcher's active backend,
    not a per-processor setting) makes the patched processors call the original ones inside
    the block, with a warning; outside it the kernels run again (it used to be ignored)."""
    from diffusers.models.attention_dispatch import attention_backend
    model = wan().eval()
    args, kw = wan_inputs()
    calls = []
    orig = vk.rope3d_attention
    monkeypatch.setattr(vk, "rope3d_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    with torch.no_grad():
        ref = run(model, args, kw)
        vkd.apply(model, backend="cpu")
        with attention_backend("_native_math"):
            with pytest.warns(UserWarning, match=r"attention_backend\(\.\.\.\) made another"):
                out = run(model, args, kw)
        assert not calls
        close(out, ref)
        close(run(model, args, kw), ref)
        assert calls


def test_no_attention_kernel_on_the_gpu(monkeypatch):
    """Under the default choice on a GPU where no rope3d_attention kernel runs (a T4: the Triton
    kernels need compute capability 8.0), the patched processors are told to call the original
    ones (diffusers' own rotation + SDPA, what the op's no-kernel path computes);
    not for a backend named at apply() or in force, not on an sm_80+ GPU, not on the CPU.
    Emulated GPUs, on CPU."""
    from vidgen_kernels import backends
    if not backends.HAS_TRITON:
        pytest.skip("triton is not installed")
    fake_gpus(monkeypatch, [("Tesla T4", (7, 5), 65536), ("NVIDIA H100 80GB HBM3", (9, 0), 232448)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    t4, h100 = torch.device("cuda", 0), torch.device("cuda", 1)
    why = vkd._no_attention_kernel(t4, None)
    assert why is not None and "compute capability >= 8.0" in why and "Tesla T4" in why, why
    assert vkd._no_attention_kernel(t4, "auto") == why
    for backend in ("reference", "triton", "cpu"):  # named: the user's choice stands
        assert vkd._no_attention_kernel(t4, backend) is None
    with vk.use_backend("reference"):
        assert vkd._no_attention_kernel(t4, None) is None
    assert vkd._no_attention_kernel(h100, None) is None
    assert vkd._no_attention_kernel(torch.device("cpu"), None) is None


@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_no_attention_kernel_falls_back_to_original(monkeypatch, which):
    """Where no rope3d_attention kernel runs (simulated here), each patched processor returns
    exactly what the original returns, with one warning that says why; the fused norms stay."""
    model = (cogvideox() if which == "cogvideox" else wan()).eval()
    args, kw = cog_inputs("int") if which == "cogvideox" else wan_inputs()
    vkd.apply(model)
    monkeypatch.setattr(vkd, "_no_attention_kernel", lambda device, backend: "a T4 (sm_75)")
    calls = []
    monkeypatch.setattr(vk, "rope3d_attention", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        # the warning names the attention module, as apply()'s warnings do
        with pytest.warns(UserWarning, match=r"Processor of (transformer_)?blocks\.0\.attn1 falls back "
                                             r"to the original .*: no rope3d_attention "
                                             r"kernel runs on cpu \(a T4 \(sm_75\)\)"):
            out = run(model, args, kw)
        assert not calls
        blocks = model.transformer_blocks if which == "cogvideox" else model.blocks
        attn = blocks[0].attn1
        h = torch.randn(1, 6, attn.heads * HEAD_DIM)
        if which == "cogvideox":
            e = torch.randn(1, 3, attn.heads * HEAD_DIM)
            got, want = attn.processor(attn, h, e), attn.processor.original(attn, h, e)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        else:
            assert torch.equal(attn.processor(attn, h), attn.processor.original(attn, h))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# both / general
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_torch_compile_of_patched_model(which):
    if which == "cogvideox":
        model, (args, kw) = cogvideox().eval(), cog_inputs("frac")
    else:
        model, (args, kw) = wan().eval(), wan_inputs()
    with torch.no_grad():
        ref = run(model, args, kw)
        vkd.apply(model, backend="cpu")
        torch._dynamo.reset()
        compiled = torch.compile(model)
        out = compiled(*args, **kw, return_dict=False)[0]
    close(out, ref)


def test_unsupported_model_type_warns():
    with pytest.warns(UserWarning, match="Linear.*only CogVideoXTransformer3DModel"):
        m = vkd.apply(torch.nn.Linear(2, 2))
    assert not vkd.is_patched(m)
    # not a module at all: a TypeError, with or without a backend (with one it raised
    # AttributeError: 'str' object has no attribute 'parameters')
    for kw in ({}, {"backend": "cpu"}):
        with pytest.raises(TypeError, match="apply: model must be a diffusers .* got str"):
            vkd.apply("notamodel", **kw)


def test_core_package_does_not_import_diffusers():
    code = ("import sys, vidgen_kernels, vidgen_kernels.nn, vidgen_kernels.integrations, "
            "vidgen_kernels.integrations.diffusers; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.id != "reference"])
@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_bf16_forward_within_dtype_tolerance(which, backend, device):
    """bf16 weights and activations: the patched model stays within a few bf16 ulps (the kernels
    round once where diffusers rounds rotated q/k and the residual terms separately). Also on
    the Triton kernels in the interpreter, the GPU's code in the GPU's dtype."""
    if which == "cogvideox":
        model, (args, kw) = cogvideox(), cog_inputs("frac")
        args = (args[0].bfloat16(), args[1].bfloat16(), args[2])
    else:
        model, (args, kw) = wan(), wan_inputs()
        args = (args[0].bfloat16(), args[1], args[2].bfloat16())
    model = model.to(device, torch.bfloat16).eval()
    args, kw = to_device(args, kw, device)
    with torch.no_grad():
        ref = run(model, args, kw).float()
        vkd.apply(model, backend=backend)
        out = run(model, args, kw)
    assert out.dtype == torch.bfloat16
    close(out.float(), ref, rtol=2e-2)


def test_cogvideox_gradient_checkpointing_grads_match():
    model = cogvideox().train()
    model.enable_gradient_checkpointing()
    args, kw = cog_inputs("int")
    _, ref = train_step(model, args, kw)
    vkd.apply(model, backend="cpu")
    _, g = train_step(model, args, kw)
    for n in ref:
        close(g[n], ref[n], rtol=1e-5)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.id != "reference"])
@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_autocast_training_step_matches(which, backend, device):
    """fp32 weights under bf16 ``torch.autocast``, the usual mixed-precision training: the
    patched model's output and gradients stay within bf16 tolerance of the unpatched model's
    under the same autocast. (Under CUDA autocast diffusers' LayerNorm / RMSNorm QK norms can
    hand the attention fp32 q / k with a bf16 v; the ops cast them as autocast does for SDPA.)"""
    if backend == "triton":
        pytest.skip("Triton interpreter: its bf16 path is tested by test_bf16_forward_*")
    if which == "cogvideox":
        model, (args, kw) = cogvideox(), cog_inputs("frac")
    else:
        model, (args, kw) = wan(), wan_inputs()
    model = model.to(device).train()
    args, kw = to_device(args, kw, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref_out, ref_grads = train_step(model, args, kw)
        no_warnings(vkd.apply, model, backend=backend)
        out, g = train_step(model, args, kw)
    assert out.dtype == ref_out.dtype
    close(out.float(), ref_out.float(), rtol=2e-2)
    assert g.keys() == ref_grads.keys()
    for n in g:
        close(g[n], ref_grads[n], rtol=5e-2)


@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_jvp_and_gradient_penalty_match_unpatched(which):
    """Beyond ``.backward()`` on the patched model (default backend): ``torch.func.jvp`` w.r.t.
    the latents (consistency / MeanFlow training; the ops run their reference there) and an
    R1-style gradient penalty (``create_graph=True``, then backward to the parameters; the
    kernels' backward returns a differentiable graph) equal the unpatched model's (on SDPA's
    math backend: unpatched, the CPU flash attention cannot do forward AD)."""
    if which == "cogvideox":
        model, (args, kw) = cogvideox(), cog_inputs("frac")
    else:
        model, (args, kw) = wan(), wan_inputs()
    x, rest = args[0], args[1:]
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def jvp():
        return torch.func.jvp(lambda x: run(model, (x,) + rest, kw), (x,), (tx,))[1]

    def penalty():
        model.zero_grad()
        xx = x.clone().requires_grad_()
        gx, = torch.autograd.grad(run(model, (xx,) + rest, kw).square().sum(), xx,
                                  create_graph=True)
        gx.square().sum().backward()
        return grads(model)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):  # ATen's CPU flash attention has no forward AD
        ref_t, ref_g = jvp(), penalty()
    no_warnings(vkd.apply, model)
    t, g = jvp(), penalty()
    assert ref_t.abs().max() > 0
    close(t, ref_t, rtol=1e-4)
    assert g.keys() == ref_g.keys()
    for n in g:
        close(g[n], ref_g[n], rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# hooks and wrappers added by the user or by diffusers / accelerate
# ----------------------------------------------------------------------------------------------
def _double(module, inputs, output):  # a forward hook that changes the output
    return tuple(o * 2 for o in output) if isinstance(output, tuple) else output * 2


def _hook_targets(model, which):
    """The norm modules a user (or an offload hook) may hook: every LayerNorm the fused paths
    read instead of calling, and CogVideoX's norm2 (called through forward_residual)."""
    if which == "cogvideox":
        b = model.transformer_blocks[0]
        return [b.norm1.norm, b.norm2.norm, b.norm2, model.norm_out.norm]
    return [model.blocks[0].norm1, model.blocks[1].norm3]


@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_hooks_on_norms_fire_after_apply(which):
    """A forward hook registered after apply() on a norm the fused path reads instead of calling
    (a user's hook, or accelerate's sequential-offload hook that loads the weights) fires, and the
    output equals the unpatched model with the same hooks; the patched code used to skip them
    (output off by 5e-2, or 'weight is on meta' under sequential CPU offload)."""
    make, inputs = (cogvideox, cog_inputs) if which == "cogvideox" else (wan, wan_inputs)
    args, kw = inputs("int") if which == "cogvideox" else inputs()
    ref, model = make().eval(), make().eval()
    vkd.apply(model)
    calls = {id(ref): [], id(model): []}
    for m in (ref, model):
        for t in _hook_targets(m, which):
            t.register_forward_hook(_double)
            t.register_forward_pre_hook(lambda mod, inp, c=calls[id(m)]: c.append(mod) and None)
    with torch.no_grad():
        want, got = run(ref, args, kw), run(model, args, kw)
    assert len(calls[id(model)]) == len(calls[id(ref)]) >= len(_hook_targets(ref, which))
    close(got, want)


def test_cogvideox_hooked_norm_at_apply_left_unpatched():
    model = cogvideox().eval()
    model.transformer_blocks[1].norm1.register_forward_hook(_double)
    with pytest.warns(UserWarning, match=r"transformer_blocks\.1\.norm1.*carries a hook"):
        vkd.apply(model)
    assert type(model.transformer_blocks[1].norm1) is not FusedCogVideoXLayerNormZero
    assert type(model.transformer_blocks[0].norm1) is FusedCogVideoXLayerNormZero
    assert "forward" not in model.transformer_blocks[1].__dict__


def _eval_model_and_inputs(which):
    """A tiny model of ``which`` in eval mode and its inputs (CogVideoX: integer-grid tables)."""
    if which == "cogvideox":
        return (cogvideox().eval(), *cog_inputs("int"))
    return (wan().eval(), *wan_inputs())

@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_remove_refuses_a_forward_wrapped_after_apply(which):
    """remove() after model.enable_cache(...) would delete the cache wrapper of every block (the
    cache then silently off; a later disable_cache() put back the removed forward and crashed):
    it raises, naming the block, and changes nothing; after disable_cache() it restores the
    original exactly."""
    from diffusers.hooks import FirstBlockCacheConfig
    model, args, kw = _eval_model_and_inputs(which)
    with torch.no_grad():
        before = run(model, args, kw)
        vkd.apply(model)
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        with pytest.raises(RuntimeError, match=r"blocks\.0 was wrapped after apply\(\)"):
            vkd.remove(model)
        assert vkd.is_patched(model)
        model.disable_cache()
        vkd.remove(model)
        assert torch.equal(run(model, args, kw), before)


def test_remove_keeps_a_processor_set_after_apply():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    model = cogvideox().eval()
    vkd.apply(model)
    mine = CogVideoXAttnProcessor2_0()
    model.transformer_blocks[0].attn1.set_processor(mine)
    with pytest.warns(UserWarning, match="processor was replaced after apply"):
        vkd.remove(model)
    assert model.transformer_blocks[0].attn1.processor is mine
    assert type(model.transformer_blocks[1].attn1.processor) is CogVideoXAttnProcessor2_0


def test_cogvideox_hooked_norm_out_at_apply_left_unpatched():
    """A hook on ``norm_out`` registered before apply() (it used to be silently dropped: the
    FusedAdaLayerNorm put in its place did not carry it): left unpatched with a warning, as the
    block norms are."""
    args, kw = cog_inputs("int")
    ref, model = cogvideox().eval(), cogvideox().eval()
    for m in (ref, model):
        m.norm_out.register_forward_hook(_double)
    with pytest.warns(UserWarning, match=r"left norm_out unpatched: it carries a hook"):
        vkd.apply(model)
    assert type(model.norm_out) is not FusedAdaLayerNorm
    with torch.no_grad():
        close(run(model, args, kw), run(ref, args, kw))


# ----------------------------------------------------------------------------------------------
# changes made after apply() to the fused norms, and remove()
# ----------------------------------------------------------------------------------------------
class _LoRALinear(torch.nn.Module):
    """A stand-in for peft's ``lora.Linear``: wraps the base layer, set on the parent by setattr."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _HalfLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm subclass with its own forward (the fused paths must call it, not read it)."""

    def forward(self, x):
        return super().forward(x) * 0.5


def _swap_norm(parent, name="norm", cls=_HalfLayerNorm):
    old = getattr(parent, name)
    new = cls(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine)
    new.load_state_dict(old.state_dict())
    setattr(parent, name, new)


def _change_cogvideox(model, change):
    b = model.transformer_blocks[0]
    if change == "lora":  # peft-style injection on every norm1.linear
        for blk in model.transformer_blocks:
            torch.manual_seed(3)
            blk.norm1.linear = _LoRALinear(blk.norm1.linear)
    elif change == "hook":
        return [b.norm2.register_forward_hook(_double)]
    elif change == "backward-hook":  # on a fused norm, and on a LayerNorm the fused paths read
        return [n.register_full_backward_hook(lambda m, gi, go: tuple(
            None if g is None else g * 3 for g in gi)) for n in (b.norm1, b.norm2.norm)]
    elif change == "swap-layernorm":  # the LayerNorm the fused paths read, replaced
        for parent in (b.norm1, b.norm2, model.norm_out):
            _swap_norm(parent)
    return []


@pytest.mark.parametrize("change", ["lora", "hook", "backward-hook", "swap-layernorm"])
def test_cogvideox_changes_to_fused_norms_after_apply(change):
    """Changes made after apply() inside the fused norms: a LoRA wrapper set on
    ``norm1.linear``, a forward or full backward hook on a fused norm, a LayerNorm replaced by a
    subclass with its own forward. The patched model computes as the unpatched one with the same
    change (the replaced LayerNorm used to be read, not called: 9e-2 off); remove() carries the
    change over to the original norms, silently, and restores the output and gradients exactly
    (it used to put back the original norms as they were: the LoRA or the hook lost); the hooks'
    handles still remove them."""
    args, kw = cog_inputs("int")
    ref, model = cogvideox().train(), cogvideox().train()
    vkd.apply(model)
    h_ref, h = _change_cogvideox(ref, change), _change_cogvideox(model, change)
    want, want_g = train_step(ref, args, kw)
    out, g = train_step(model, args, kw)
    close(out, want)
    for n in want_g:
        close(g[n], want_g[n], rtol=1e-4)
    no_warnings(vkd.remove, model)
    assert not any(isinstance(m, (FusedCogVideoXLayerNormZero, FusedAdaLayerNorm))
                   for m in model.modules())
    out, g = train_step(model, args, kw)
    assert torch.equal(out, want)
    assert g.keys() == want_g.keys() and all(torch.equal(g[n], want_g[n]) for n in g)
    if change == "hook":  # the handle removes the hook from the restored norm
        h[0].remove()
        h_ref[0].remove()
        with torch.no_grad():
            assert torch.equal(run(model, args, kw), run(ref, args, kw))


def test_cogvideox_fused_norm_replaced_after_apply_is_kept_by_remove():
    """A fused norm replaced wholesale after apply() (by the user's own CogVideoXLayerNormZero):
    the fused block forward calls it (it used to call its missing ``forward_residual``), and
    remove() keeps it, with a warning naming it, instead of putting the original back."""
    from diffusers.models.normalization import CogVideoXLayerNormZero
    args, kw = cog_inputs("int")
    ref, model = cogvideox().eval(), cogvideox().eval()
    vkd.apply(model)
    for m in (ref, model):
        torch.manual_seed(4)
        m.transformer_blocks[0].norm2 = mine = CogVideoXLayerNormZero(8, 32)
    with torch.no_grad():
        want = run(ref, args, kw)
        close(run(model, args, kw), want)
        with pytest.warns(UserWarning, match=r"transformer_blocks\.0\.norm2: it was replaced "
                          r"after apply\(\) by CogVideoXLayerNormZero"):
            vkd.remove(model)
        assert model.transformer_blocks[0].norm2 is mine
        assert torch.equal(run(model, args, kw), want)


def test_cogvideox_fused_norm_wrapped_after_apply_left_in_place_by_remove():
    """A fused norm whose forward was wrapped after apply() (as accelerate's add_hook_to_module
    does): remove() cannot carry the wrapper over, so it leaves that fused norm in place (it
    computes as the original), with a warning naming it; it used to drop the wrapper silently."""
    args, kw = cog_inputs("int")
    ref, model = cogvideox().eval(), cogvideox().eval()
    vkd.apply(model)
    for m in (ref, model):
        norm = m.transformer_blocks[1].norm1
        norm.forward = lambda *a, f=norm.forward, **k: tuple(o * 2 for o in f(*a, **k))
    with torch.no_grad():
        want = run(ref, args, kw)
        with pytest.warns(UserWarning, match=r"transformer_blocks\.1\.norm1: its forward was "
                          r"wrapped after apply\(\).*left in place"):
            vkd.remove(model)
        assert type(model.transformer_blocks[1].norm1) is FusedCogVideoXLayerNormZero
        assert type(model.transformer_blocks[0].norm1) is not FusedCogVideoXLayerNormZero
        close(run(model, args, kw), want)


def test_wan_norm_replaced_after_apply_is_called():
    """Wan's ``norm1`` / ``norm3`` replaced after apply() by an FP32LayerNorm subclass with its
    own forward: the fused modulation calls it (it used to read its weight: wrong output)."""
    from diffusers.models.normalization import FP32LayerNorm

    class HalfFP32LayerNorm(FP32LayerNorm):
        def forward(self, x):
            return super().forward(x) * 0.5
    args, kw = wan_inputs()
    ref, model = wan().eval(), wan().eval()
    vkd.apply(model)
    for m in (ref, model):
        _swap_norm(m.blocks[0], "norm1", HalfFP32LayerNorm)
        _swap_norm(m.blocks[1], "norm3", HalfFP32LayerNorm)
    with torch.no_grad():
        close(run(model, args, kw), run(ref, args, kw))


# ----------------------------------------------------------------------------------------------
# inputs, saving
# ----------------------------------------------------------------------------------------------
def test_cogvideox_short_rotary_table_raises():
    """An ``image_rotary_emb`` for fewer frames than the latents (32 rows, 48 video tokens):
    diffusers raises a size mismatch; the patched processor used to rotate the first 32 tokens
    only, silently. It raises a ValueError naming the table and both lengths."""
    model = cogvideox().eval()
    args, _ = cog_inputs(None)
    kw = {"image_rotary_emb": get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (4, 4)), (4, 4), 2)}
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            run(model, args, kw)
        vkd.apply(model)
        with pytest.raises(ValueError, match=r"image_rotary_emb has 32 rows .* 48 video tokens"):
            run(model, args, kw)


@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_torch_save_and_load_of_patched_model(which):
    """``torch.save(model)`` of a patched model, then ``torch.load``: it used to fail to load (the
    bound block forward pickled as ``getattr(block, '_cogvideox_block_forward')``). The loaded
    model is patched, computes what the saved one does, and remove() restores the original."""
    import io
    model, args, kw = _eval_model_and_inputs(which)
    with torch.no_grad():
        before = run(model, args, kw)
        vkd.apply(model)
        patched = run(model, args, kw)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert vkd.is_patched(loaded)
        assert torch.equal(run(loaded, args, kw), patched)
        no_warnings(vkd.remove, loaded)
        assert torch.equal(run(loaded, args, kw), before)


def test_wan_text_of_batch_one_broadcasts_over_the_latents():
    """Text of batch 1 for latents of batch 2: diffusers' SDPA broadcasts it, and so does the
    patched cross-attention now (it raised 'k/v batch 1 != q batch 2'); outputs and gradients
    match."""
    (x, t, e), kw = wan_inputs()
    args = (x, t, e[:1])
    ref_model = wan()
    want = train_step(ref_model, args, kw)
    model = vkd.apply(wan())
    got = train_step(model, args, kw)
    close(got[0], want[0])
    for n, g in want[1].items():
        close(got[1][n], g, rtol=1e-4)


def test_apply_checks_the_backend_name(monkeypatch):
    """A backend name that does not exist raises at apply() (it patched and failed at the first
    forward, naming a kernel); one that cannot run on the model's device warns (the model may
    move) and patches; one with no RoPE-3D attention kernel (cuda: it patched, with only the
    device warning, and every attention call raised BackendUnavailableError) leaves the model
    unpatched with a warning naming the model and the backends that have one."""
    model = wan()
    with pytest.raises(ValueError, match="apply: backend must be None or one of .*got 'cpp'"):
        vkd.apply(model, backend="cpp")
    assert not vkd.is_patched(model)
    with pytest.warns(UserWarning) as rec:
        vkd.apply(model, backend="cuda")
    assert [str(w.message) for w in rec] == [
        "vidgen_kernels.integrations.diffusers: left WanTransformer3DModel unpatched: backend "
        "'cuda' has no RoPE-3D attention kernel (those with one: cpu, triton, or 'auto' / "
        "'reference')"]
    assert not vkd.is_patched(model)
    real = vk.backends.why_unavailable
    monkeypatch.setattr(vk.backends, "why_unavailable",
                        lambda name, dev=None: "no GPU here" if name == "triton" else real(name, dev))
    with pytest.warns(UserWarning, match=r"backend 'triton' cannot run on cpu \(no GPU here\); "
                      r"the patched calls raise there"):
        vkd.apply(model, backend="triton")
    assert vkd.is_patched(model)


def test_apply_checks_what_a_named_backend_runs():
    """A named backend whose attention kernel cannot take the model (apply patched it without a
    word and the first forward raised): a head size over its limit leaves the model unpatched
    with a warning naming the model and the reason; a dtype it does not run warns (the model
    may be cast after apply, as it may move) and patches; auto takes both."""
    big = wan(num_attention_heads=1, attention_head_dim=4096)
    with pytest.warns(UserWarning, match=r"left WanTransformer3DModel unpatched: backend 'cpu' "
                      r"takes head_dim <= 4095, the model's attention_head_dim is 4096"):
        vkd.apply(big, backend="cpu")
    assert not vkd.is_patched(big)
    f64 = wan().double()
    with pytest.warns(UserWarning, match=r"backend 'cpu' does not run torch.float64 attention; "
                      r"the patched calls raise until the model is cast"):
        vkd.apply(f64, backend="cpu")
    assert vkd.is_patched(f64)
    import warnings
    for m in (wan(num_attention_heads=1, attention_head_dim=4096), wan().double()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vkd.apply(m)
        assert vkd.is_patched(m)


@pytest.mark.parametrize("which", ["cogvideox", "wan"])
def test_cache_enabled_and_disabled_before_apply_is_no_hook(which):
    """enable_cache() then disable_cache() leaves an empty hook registry and the class's forward
    bound on each block: apply() fuses those blocks without a warning (it warned "its forward
    carries a hook" and left every block unfused), with the unpatched outputs."""
    from diffusers.hooks import FirstBlockCacheConfig
    model, args, kw = _eval_model_and_inputs(which)
    with torch.no_grad():
        want = run(model, args, kw)
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        model.disable_cache()
        no_warnings(vkd.apply, model)
        blocks = model.transformer_blocks if which == "cogvideox" else model.blocks
        assert all(isinstance(b.__dict__.get("forward"), functools.partial) for b in blocks)
        close(run(model, args, kw), want)
        vkd.remove(model)
        assert torch.equal(run(model, args, kw), want)


@pytest.mark.parametrize("why", ["mask", "no_kernel"])
def test_wan_fallback_keeps_the_attention_backend_set_after_apply(monkeypatch, why):
    """Whatever makes a patched Wan processor fall back (an attention mask, a GPU without a
    rope3d_attention kernel), the original runs with the attention backend diffusers set on the
    processor after apply() (those fallbacks returned before handing it over), for that call
    only: the original keeps none afterwards (it kept it, and remove() after the model's
    reset_attention_backend() gave back an original still pinned to it)."""
    model = wan().eval()
    vkd.apply(model, backend=None)
    model.set_attention_backend("native")
    if why == "no_kernel":
        monkeypatch.setattr(vkd, "_no_attention_kernel", lambda device, backend: "a T4 (sm_75)")
    attn = model.blocks[0].attn1
    proc = attn.processor
    assert proc._attention_backend is not None and proc.original._attention_backend is None
    seen = []

    class Spy(type(proc.original)):
        def __call__(self, *args, **kwargs):
            seen.append(self._attention_backend)
            return super().__call__(*args, **kwargs)
    proc.original.__class__ = Spy
    h = torch.randn(1, 6, attn.heads * HEAD_DIM)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool) if why == "mask" else None
    with torch.no_grad(), pytest.warns(UserWarning, match="of blocks.0.attn1 falls back to the original"):
        got = proc(attn, h, attention_mask=mask)
    assert seen == [proc._attention_backend]
    assert proc.original._attention_backend is None and "_attention_backend" not in \
        vars(proc.original)
    with torch.no_grad():
        assert torch.equal(got, proc.original(attn, h, attention_mask=mask))


def test_wan_remove_after_reset_attention_backend_restores_exactly():
    """apply -> set_attention_backend -> forward (the patched processors fall back) ->
    reset_attention_backend -> remove: the original processors come back without the backend
    (they kept it: an explicit per-processor backend then overrode a later
    ``attention_backend(...)`` context, unlike the model that was never patched)."""
    import warnings
    ctrl, model = wan().eval(), wan().eval()
    args, kw = wan_inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vkd.apply(model)
        for m in (ctrl, model):
            m.set_attention_backend("_native_math")
            run(m, args, kw)
            m.reset_attention_backend()
        vkd.remove(model)
    assert [p._attention_backend for p in model.attn_processors.values()] == \
        [p._attention_backend for p in ctrl.attn_processors.values()] == [None] * 4
    with torch.no_grad():
        assert torch.equal(run(model, args, kw), run(ctrl, args, kw))


def test_apply_checks_the_default_backend():
    """A process default without a RoPE-3D attention kernel (``use_backend("cuda")`` /
    VIDGEN_KERNELS_BACKEND=cuda) leaves the model unpatched with a warning, as the same backend
    named does (apply(model) patched, and every attention call raised); a patched model whose
    calls run under such a default falls back to the original processors."""
    model = wan()
    with vk.use_backend("cuda"), pytest.warns(UserWarning) as rec:
        vkd.apply(model)
    assert [str(w.message) for w in rec] == [
        "vidgen_kernels.integrations.diffusers: left WanTransformer3DModel unpatched: the "
        "default backend 'cuda' (vidgen_kernels.use_backend / VIDGEN_KERNELS_BACKEND) has no "
        "RoPE-3D attention kernel (those with one: cpu, triton, or 'auto' / 'reference')"]
    assert not vkd.is_patched(model)
    vkd.apply(model)
    cpu = torch.device("cpu")
    assert vkd._no_attention_kernel(cpu, None) is None
    assert vkd._no_attention_kernel(cpu, "cpu") is None
    with vk.use_backend("cuda"):
        assert vkd._no_attention_kernel(cpu, None) == "backend 'cuda' has no RoPE-3D attention kernel"
        assert vkd._no_attention_kernel(cpu, "reference") is None


def test_processor_pickled_without_later_attributes_still_warns(monkeypatch):
    """A patched processor pickled by an older version (its __dict__ without ``module_name`` /
    ``_warned`` / ``backend``, added later) unpickles and falls back with a warning instead of
    an AttributeError in the warning path."""
    import pickle
    model = wan().eval()
    vkd.apply(model, backend=None)
    attn = model.blocks[0].attn1
    proc = attn.processor
    for name in ("module_name", "_warned", "backend"):
        del proc.__dict__[name]
    old = pickle.loads(pickle.dumps(proc))
    assert "module_name" not in old.__dict__
    h = torch.randn(1, 6, attn.heads * HEAD_DIM)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"WanRoPE3DAttnProcessor falls back to the original"):
        got = old(attn, h, attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(got, old.original(attn, h, attention_mask=mask))
