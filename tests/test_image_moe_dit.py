"""ImageMoEDiT at tiny configs: shapes, zero-init, fused vs backend="reference" (forward and
backward), the MoE aux loss, the dual-stream interaction, generate_image, a short training run and
bad inputs."""

import pytest
import torch
from helpers import MODEL_DEVICES, assert_fused_matches_reference, perturb

import vidgen_kernels as vk
from vidgen.models.image_moe_dit import ImageMoEDiT, ImageMoEDiTConfig
from vidgen.pipelines import generate_image
from vidgen.schedulers import FlowMatchingScheduler
from vidgen.training import flow_matching_loss, make_optimizer

TEXT_DIM = 24
C = 3


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=C, hidden_size=32, depth=2, num_heads=2, text_dim=TEXT_DIM)
    cfg.update(kw)
    return ImageMoEDiT(ImageMoEDiTConfig(**cfg))



def inputs(B=2, H=8, W=8, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, TEXT_DIM, generator=g))


def test_config_and_attributes():
    m = tiny(backend="reference")
    assert m.backend == "reference" and m.config.out_channels == C
    d = ImageMoEDiTConfig()
    assert (d.in_channels, d.patch_size, d.num_experts, d.top_k, d.shared_expert) == (4, 2, 4, 2, True)
    assert len(m.blocks) == 2
    assert m.blocks[0].moe.num_experts == 4 and m.blocks[0].moe.top_k == 2
    assert m.blocks[-1].attn.txt_proj is None and m.blocks[0].attn.txt_proj is not None
    assert float(m.aux_loss) == 0.0          # before any forward


@pytest.mark.parametrize("H,W", [(8, 8), (6, 10), (4, 12), (2, 2)])
def test_shapes_and_zero_init(H, W):
    m = tiny()
    x, t, text = inputs(H=H, W=W)
    y = m(x, t, text)
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0       # zero-initialised gates / final layer
    perturb(m)
    y = m(x, t, text)
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_out_channels_scalar_t_and_5d_input():
    m = perturb(tiny(out_channels=5))
    x, t, text = inputs(H=6, W=4)
    y = m(x, 0.3, text[:1])                  # scalar t, text batch 1 broadcasts
    assert y.shape == (2, 5, 6, 4)
    y4 = m(x, t, text)
    y5 = m(x[:, None], t, text)              # one-frame video, as generate_image passes
    assert y5.shape == (2, 1, 5, 6, 4)
    torch.testing.assert_close(y5[:, 0], y4)


@pytest.mark.parametrize("device", MODEL_DEVICES)
def test_fused_matches_reference_fwd_bwd(device):
    x, t, text = inputs(H=6, W=10, L=4)
    assert_fused_matches_reference(perturb(tiny()), x, t, text, aux=True, every_param_grad=True,
                                   device=device)


def test_aux_loss():
    m = perturb(tiny())
    x, t, text = inputs()
    m(x, t, text)
    aux = m.aux_loss
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    assert aux.requires_grad
    # the sum over the blocks' MoE losses
    torch.testing.assert_close(aux, sum(b.moe.aux_loss for b in m.blocks))


def test_dual_stream_interaction():
    """Text reaches the image output through the joint attention alone (cross-attention output
    and pooled-text conditioning zeroed); removing the text stream's input kills that path."""
    m = perturb(tiny())
    with torch.no_grad():
        for b in m.blocks:
            b.cross_attn.proj.weight.zero_()
            b.cross_attn.proj.bias.zero_()
        m.text_pool[2].weight.zero_()
        m.text_pool[2].bias.zero_()
    x, t, text = inputs()
    text2 = torch.randn_like(text)
    with torch.no_grad():
        y1, y2 = m(x, t, text), m(x, t, text2)
        assert (y1 - y2).abs().max() > 1e-4            # the image stream reads the text stream
        # control: a constant text stream makes the output independent of the text
        m.context_embedder.weight.zero_()
        assert torch.equal(m(x, t, text), m(x, t, text2))
    # the text stream reads the image stream too (first block's text output depends on the image)
    m = perturb(tiny())
    blk = m.blocks[0]
    D = m.config.hidden_size
    g = torch.Generator().manual_seed(3)
    img, img2 = torch.randn(2, 16, D, generator=g), torch.randn(2, 16, D, generator=g)
    txt, c, text = torch.randn(2, 3, D, generator=g), torch.randn(2, D, generator=g), inputs()[2]
    rope = vk.rope3d_freqs(1, 4, 4, m.head_dim, axes_dims=(0, m.head_dim // 2, m.head_dim // 2))
    with torch.no_grad():
        _, t1 = blk(img, txt, c, text, rope)
        _, t2 = blk(img2, txt, c, text, rope)
    assert (t1 - t2).abs().max() > 1e-4


def test_generate_image():
    m = perturb(tiny())
    text = torch.randn(2, 3, TEXT_DIM)
    null = torch.zeros(1, 3, TEXT_DIM)
    img = generate_image(m, text, null, height=6, width=4, num_inference_steps=2, guidance_scale=3.0,
                         seed=0, show_progress=False)
    assert img.shape == (2, C, 6, 4) and torch.isfinite(img).all()


def test_short_training_run_loss_decreases():
    m = tiny(depth=1)
    sched = FlowMatchingScheduler()
    opt = make_optimizer(m, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, C, 4, 4, generator=g).sign()     # a fixed tiny "dataset"
    text = torch.randn(4, 2, TEXT_DIM, generator=g)

    def eval_loss():                                      # fixed noise and t: deterministic
        ge = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(flow_matching_loss(m, x0, text, sched, generator=ge).item() for _ in range(4)) / 4

    before = eval_loss()
    for _ in range(20):
        loss = flow_matching_loss(m, x0, text, sched, generator=g)
        total = loss + 0.01 * m.aux_loss
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        assert torch.isfinite(total)
    after = eval_loss()
    assert after < 0.9 * before, (before, after)


def test_bad_inputs():
    m = tiny()
    x, t, text = inputs(H=8, W=8)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        m(x[..., :7], t, text)
    with pytest.raises(ValueError, match="H=7"):
        m(x[..., :7, :], t, text)
    with pytest.raises(ValueError, match="channels"):
        m(x[:, :2], t, text)
    with pytest.raises(ValueError, match="text_dim"):
        m(x, t, torch.randn(2, 3, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="text batch"):
        m(x, t, torch.randn(3, 3, TEXT_DIM))
    with pytest.raises(ValueError, match="text embeddings"):
        m(x, t, torch.randn(2, TEXT_DIM))
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(3), text)
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(2, 1), text)
    with pytest.raises(ValueError, match=r"x must be"):
        m(x[0], t, text)
    with pytest.raises(ValueError, match="one frame"):
        m(torch.randn(2, 2, C, 8, 8), t, text)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=3)


@pytest.mark.parametrize("bad,match", [
    ({"depth": 2.5}, "depth must be an int >= 1, got 2.5"),   # was range()'s raw TypeError
    ({"depth": 0}, "depth must be an int >= 1, got 0"),
    ({"text_dim": 0}, "text_dim must be an int >= 1, got 0"),  # was accepted
    ({"in_channels": 0}, "in_channels must be an int >= 1, got 0"),  # was accepted
    ({"out_channels": 0}, "out_channels must be an int >= 1, got 0"),
    ({"num_experts": 0, "top_k": 1}, "num_experts must be an int >= 1, got 0"),
    ({"top_k": 1.5}, "top_k must be an int >= 1, got 1.5"),
    ({"top_k": 5}, r"top_k must be in \[1, num_experts=4\], got 5"),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_configs_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_inputs_of_the_wrong_dtype_or_type_are_named():
    """A float64 / bf16 x or text into the fp32 model raised torch's "mat1 and mat2 must have the
    same dtype"; a list x a ValueError: TypeErrors naming the argument (4D and one-frame 5D x).
    Under torch.autocast bf16 inputs stay legal."""
    m = tiny()
    x, t, text = inputs(H=4, W=4)
    for xx in (x.double(), x[:, None].bfloat16()):
        with pytest.raises(TypeError, match=rf"x has dtype {xx.dtype} but the model's parameters are torch.float32"):
            m(xx, t, text)
    with pytest.raises(TypeError, match="text has dtype torch.float64 but the model's parameters are torch.float32"):
        m(x, t, text.double())
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of image latents \[B, C, H, W\].*got list"):
        m(x.tolist(), t, text)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x[:, None].bfloat16(), t, text.bfloat16()).shape == (2, 1, C, 4, 4)
