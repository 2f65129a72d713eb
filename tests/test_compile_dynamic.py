"""Every public op under ``torch.compile(fullgraph=True, dynamic=True)``: the sizes a video model
varies (tokens, frames, grid, experts' token counts) are symbolic, the compiled op computes what
the eager op does, forward and backward, at several sizes, and a new size does not recompile.

This is what ``torch.compile(model)`` does by itself once a second resolution or frame count
arrives (automatic dynamic shapes): every check, reshape and custom-op fake must accept
symbolic sizes. (``adaln_modulate`` with a ``[B, 1, C]`` shift failed here with a false
"shift has batch 2 but x has B=2": its error message, formatted before the check, specialised
the sizes, after which dynamo answered ``Bp in (1, B)`` wrongly; and ``math.isinf(eps)`` broke
the graph.)"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import vidgen_kernels as vk
from helpers import assert_close_rule

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")])]


def _leaf(*shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()


# Each case: (op call f(*tensors, **ints), its inputs at size i in {0, 1, 2}, the ints). Sizes
# are odd and pairwise distinct, so that dynamo's duck sizing does not tie two of them to one
# symbol by accident; the ints (offsets, tokens per frame) are arguments, as in a model.
def _adaln_f(x, sh, sc, w):
    return vk.adaln_modulate(x, sh, sc, weight=w, eps=1e-5)


def _adaln(i, device):
    B, N, C = 2, (5, 9, 13)[i], 24
    return _adaln_f, [_leaf(B, N, C, seed=0, device=device), _leaf(B, 1, C, seed=1, device=device),
                      _leaf(B, C, seed=2, device=device), _leaf(C, seed=3, device=device)], {}


def _gated_f(x, y, g, sh, sc):
    return torch.cat(vk.gated_residual_adaln(x, y, g, sh, sc, norm="rms"), -1)


def _gated(i, device):
    B, F, C = 2, (3, 5, 7)[i], 24
    N = F * (3, 5, 7)[2 - i]
    return _gated_f, [_leaf(B, N, C, seed=0, device=device), _leaf(B, N, C, seed=1, device=device),
                      _leaf(B, F, C, seed=2, device=device), _leaf(B, C, seed=3, device=device),
                      _leaf(1, N, C, seed=4, device=device)], {}


_PRE, _GRID = (3, 5, 7), ((1, 3, 5), (2, 3, 5), (3, 5, 3))


def _rope_f(x, cos, sin, *, pre):
    return vk.apply_rope(x, cos, sin, offset=pre)


def _rope(i, device):
    cos, sin = vk.rope3d_freqs(*_GRID[i], 32, device=device)
    S = _PRE[i] + cos.shape[0]
    return _rope_f, [_leaf(2, S, 2, 32, seed=0, device=device), cos, sin], dict(pre=_PRE[i])


def _attn_f(qkv, cos, sin, *, pre, tpf, frame_causal):
    q, k, v = qkv.unbind(2)  # strided slices of one projection, read in place
    return vk.rope3d_attention(q, k, v, cos, sin, rope_offset=pre, frame_causal=frame_causal,
                               tokens_per_frame=tpf if frame_causal else None)


def _rope3d_attention(i, device, frame_causal):
    grid = _GRID[i]
    cos, sin = vk.rope3d_freqs(*grid, 32, device=device)
    S = _PRE[i] + cos.shape[0]
    dt = torch.float32 if device == "cpu" else torch.float16
    return _attn_f, [_leaf(1, S, 3, 2, 32, seed=0, device=device, dtype=dt), cos, sin], dict(
        pre=_PRE[i], tpf=grid[1] * grid[2], frame_causal=frame_causal)


def _temporal_f(q, k, v, cos, sin, *, q_off):
    return vk.temporal_attention(q, k, v, cos=cos, sin=sin, q_offset=q_off)


def _temporal_attention(i, device):
    T, S, q_off, D = (7, 11, 15)[i], (13, 17, 19)[i], (4, 6, 8)[i], 32  # 0 and 1 would be specialised
    dt = torch.float32 if device == "cpu" else torch.float16
    cos, sin = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0), device=device)
    q = _leaf(2, T - q_off, S, 2, D, seed=0, device=device, dtype=dt)
    k, v = (_leaf(2, T, S, 2, D, seed=s, device=device, dtype=dt) for s in (1, 2))
    return _temporal_f, [q, k, v, cos, sin], dict(q_off=q_off)


def _moe_f(x, logits, w1, w2, b1):
    o = vk.moe_ffn(x, logits, w1, w2, b1=b1, top_k=2, activation="geglu")
    return o.out.sum(-1) + o.aux_loss + o.z_loss


def _moe(i, device):
    N, E, C, F = (7, 13, 29)[i], 4, 16, 24
    return _moe_f, [_leaf(N, C, seed=0, device=device), _leaf(N, E, seed=1, device=device),
                    _leaf(E, C, 2 * F, seed=2, device=device), _leaf(E, F, C, seed=3, device=device),
                    _leaf(E, 2 * F, seed=4, device=device)], {}


CASES = {
    "adaln_modulate": _adaln,
    "gated_residual_adaln": _gated,
    "apply_rope": _rope,
    "rope3d_attention": lambda i, d: _rope3d_attention(i, d, False),
    "rope3d_attention_frame_causal": lambda i, d: _rope3d_attention(i, d, True),
    "temporal_attention_streaming_rope": _temporal_attention,
    "moe_ffn": _moe,
}


def _three_sizes(case, device) -> tuple[int, int, str]:
    """Compiles the case once (dynamic=True) and runs it at three sizes, each checked against
    eager forward and backward; returns (graphs after the first size, graphs at the end, the
    guards that failed in between)."""
    from torch._dynamo.utils import guard_failures
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    compiled = None
    for i in range(3):
        fn, args, ints = CASES[case](i, device)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=True)
        leaves = [a for a in args if a.requires_grad]
        want = fn(*args, **ints)
        want_g = torch.autograd.grad(want.float().square().sum(), leaves)
        got = compiled(*args, **ints)
        got_g = torch.autograd.grad(got.float().square().sum(), leaves)
        # compiled vs eager (eager as both references): max error <= tol x max(1, the scale)
        tol = 1e-5 if want.dtype == torch.float32 else 2e-3
        assert_close_rule(got, want, want, f"size {i} output", floor=tol)
        for j, (a, b) in enumerate(zip(got_g, want_g)):
            assert_close_rule(a, b, b, f"size {i} gradient {j}", floor=tol)
        if i == 0:
            first = counters["stats"]["unique_graphs"]
    why = str({c.co_name: [str(r)[:500] for r in v] for c, v in guard_failures.items()})
    return first, counters["stats"]["unique_graphs"], why


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_op_compiles_with_dynamic_shapes(case, device):
    """The first graph is symbolic in the sizes: the second and third sizes reuse it. A size
    that recompiles is run once more from a reset: a graph specialised on a size recompiles
    again and fails; a one-off recompile (fresh-clone CI runs saw one twice, for
    rope3d_attention_frame_causal, never reproduced locally) is reported as a warning with the
    guards that failed, so the next occurrence says why."""
    first, last, why = _three_sizes(case, device)
    if last != first:
        warnings.warn(f"{case}: a new size recompiled once ({last} graphs, {first} after the "
                      f"first size; failed guards: {why}); retried", stacklevel=1)
        first, last, why = _three_sizes(case, device)
    assert last == first, (f"{case}: a new size recompiled ({last} graphs, {first} after the "
                           f"first size); failed guards: {why}")


# ---- constants of the graph beside symbolic sizes; torch.export ----------------------------
def test_constant_widths_beside_symbolic_sizes():
    """A width built in the graph (a table of 8 columns for D = 16, an in-graph [2, C]
    modulation for B = 2) is a constant that dynamo compared with ``in (D // 2, D)`` /
    ``in (1, B)`` over symbolic sizes, and answered False: valid inputs raised "cos must be
    [L, D/2] ..." / "shift has batch 2 but x has B=2" under dynamic=True only."""
    def attn(q):
        c, s = vk.rope3d_freqs(2, 2, 2, 16, axes_dims=(4, 4, 8))
        return vk.rope3d_attention(q, q, q, c, s)

    def mod(x):
        return vk.adaln_modulate(x, torch.zeros(2, 16), torch.ones(2, 16))

    def gated(x):
        p = vk.nn.adaln.AdaLNParams(*torch.ones(6, 2, 16).unbind(0))
        return vk.nn.AdaLNZero.residual_out(x, x, p)

    for fn, x in ((attn, torch.randn(1, 8, 2, 16)), (mod, torch.randn(2, 6, 16)),
                  (gated, torch.randn(2, 6, 16))):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, dynamic=True)(x)
        torch.testing.assert_close(got, fn(x), rtol=1e-5, atol=1e-6)


def test_head_norm_on_a_layout_view_cannot_merge_compiles():
    """nn.HeadNorm on ``[B, H, S, D]`` transposed to ``[B, S, H, D]`` (the leading dims do not
    merge into a view) under torch.compile: it tried ``view`` and caught eager's RuntimeError,
    which compile raises as another type (TorchRuntimeError)."""
    n = vk.nn.HeadNorm(8, "rms")
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(n, fullgraph=True)(x), n(x))


def test_export_keeps_the_sequence_length_dynamic():
    """``torch.export`` (non-strict, the default) of rope3d_attention with a symbolic S: the
    checks returned ``int(video_len)``, which pinned S to the example's value ("Constraints
    violated (S)! ... specialized it to be a constant (12)")."""
    from torch.export import Dim, export

    class A(torch.nn.Module):
        def forward(self, q, k, v, c, s):
            return vk.rope3d_attention(q, k, v, c, s, rope_offset=0)

    S = Dim("S", min=2, max=4096)
    t = lambda n, seed: torch.randn(1, n, 2, 16, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    ep = export(A(), (t(12, 0), t(12, 1), t(12, 2), *vk.rope3d_freqs(1, 1, 12, 16)),
                dynamic_shapes=({1: S},) * 3 + ({0: S},) * 2)
    args = (t(20, 3), t(20, 4), t(20, 5), *vk.rope3d_freqs(1, 1, 20, 16))
    torch.testing.assert_close(ep.module()(*args), A()(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["temporal_q_offset", "apply_rope_table", "rope3d_table"])
def test_size_errors_keep_their_message_under_dynamic_compile(which):
    """A size the checks reject, on a later call of a fullgraph dynamic compile: the op's own
    message (with its numbers) reaches the user. Messages that formatted symbolic sizes failed
    in dynamo instead ("BUILD_STRING type error"), hiding what was wrong."""
    from vidgen_kernels.nn.temporal_attention import rope_1d_tables
    r = torch.randn
    cases = {
        "temporal_q_offset": (lambda q, k, o: vk.temporal_attention(q, k, k, q_offset=o),
                              (r(1, 3, 3, 2, 16), r(1, 5, 3, 2, 16), 2),
                              (r(1, 4, 3, 2, 16), r(1, 7, 3, 2, 16), 2),
                              "got q_offset=2, T_q=4, T_k=7"),
        "apply_rope_table": (lambda x, c, s, o: vk.apply_rope(x, c, s, offset=o),
                             (r(1, 10, 2, 16), *rope_1d_tables(7, 16), 3),
                             (r(1, 12, 2, 16), *rope_1d_tables(11, 16), 3),
                             "the tables have 11 positions but x has only S - offset = 12 - 3 = 9"),
        "rope3d_table": (lambda q, c, s, o: vk.rope3d_attention(q, q, q, c, s, rope_offset=o),
                         (r(1, 12, 2, 16), *rope_1d_tables(7, 16), 5),
                         (r(1, 14, 2, 16), *rope_1d_tables(11, 16), 5),
                         "the RoPE table has 11 positions but only S - rope_offset = 14 - 5 = 9"),
    }
    fn, good, bad, msg = cases[which]
    torch._dynamo.reset()
    cf = torch.compile(fn, fullgraph=True, dynamic=True, backend="eager")
    cf(*good)
    with pytest.raises(Exception) as info:
        cf(*bad)
    assert msg in str(info.value), str(info.value)[:2000]
    torch._dynamo.reset()


@pytest.mark.triton
def test_triton_temporal_fp32_limit_keeps_frames_symbolic():
    """A growing KV cache (T_k 3, 4, 5, 7, 9) reuses one graph on the triton backend: the op
    layer checks sizes with comparisons only and leaves the resident-or-tiled choice to the
    launchers, which see concrete sizes (an int() / bit_length() of T_k in the op specialised
    it: a graph per frame until dynamo's recompile limit)."""
    from vidgen_kernels.backends import why_unavailable
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda q, k, v, o: vk.temporal_attention(q, k, v, q_offset=o, backend="triton"),
                      fullgraph=True, dynamic=True, backend="eager")
    for T in (3, 4, 5, 7, 9):
        q, k, v = (torch.randn(1, T, 2, 1, 16) for _ in range(3))
        torch.testing.assert_close(f(q[:, -1:], k, v, T - 1),
                                   vk.temporal_attention_reference(q[:, -1:], k, v, q_offset=T - 1))
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]
