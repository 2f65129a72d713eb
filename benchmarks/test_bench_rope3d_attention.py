"""Benchmarks of fused RoPE-3D + flash attention (``vidgen_kernels.rope3d_attention``).

Run::

    python -m pytest benchmarks/test_bench_rope3d_attention.py --benchmark-json /tmp/r.json  # full
    python -m pytest benchmarks/test_bench_rope3d_attention.py --quick                       # smoke
    python benchmarks/summarize.py /tmp/r.json                                                 # tables

Cases: direction (fwd, fwd+bwd, jvp) x shape x device x contender; full attention (no mask) unless
the shape says frame-causal, RoPE on the video tokens, text first (``rope_offset = text``). Each
(direction, shape, dtype, device) is one pytest-benchmark group.

* CPU, fp32: ``B=1, H=4, D=64``, video ``4x16x16`` and ``8x16x16`` latents + 16 text tokens
  (S = 1040, 2064), and ``4x16x16-frame-causal`` (``frame_causal=True``, blocks of one frame of
  256 tokens: the mask of autoregressive video diffusion; the SDPA contenders get the same
  boolean ``S x S`` mask as ``attn_mask``). ``--quick``: ``2x8x8`` + 16 text (S = 144), and
  ``2x8x8-frame-causal``.
* CUDA, bf16: CogVideoX-5B (``B=1, H=48, D=64``, 226 text + ``13x30x45`` = 17,776 tokens) and
  Wan-1.3B (``H=12, D=128``, ``21x30x52`` = 32,760 tokens, no text: Wan's text goes through
  cross-attention), and ``cogvideox-5b-frame-causal`` (blocks of one 30x45 frame; SDPA gets the
  boolean mask, so its flash and cuDNN backends may refuse it and are then skipped with the
  reason). ``--quick``: ``H=8, D=64``, 32 text + ``4x16x16``, with and without the mask.

q, k, v are the ``[B, S, H, D]`` slices of one fused ``[B, S, 3, H, D]`` projection (read in place
by the kernels); the SDPA contenders get ``[B, H, S, D]`` transposed views of the same buffers,
as diffusers' ``view(B, -1, H, D).transpose(1, 2)``. Contenders:

* each kernel backend of the op on the device (``cpu`` on CPU; ``triton`` on CUDA);
* ``reference``: ``rope3d_attention_reference`` (eager rotation + materialised softmax; CPU only:
  the S x S matrix of the GPU shapes does not fit);
* ``rotate+sdpa``: the diffusers way, ``x * cos + rotate(x) * sin`` in fp32 on the video slice
  (cat with the text), then ``F.scaled_dot_product_attention`` (default backend choice); on
  CUDA also ``rotate+sdpa-flash`` / ``rotate+sdpa-cudnn`` (forced SDPA backends) and
  ``rotate+flash-attn`` (``flash_attn_func``, when the package is importable);
* ``sdpa``: SDPA alone on the unrotated q/k/v (the floor: attention without any RoPE cost);
* ``torch.compile``: ``torch.compile`` of the ``rotate+sdpa`` function (compiled and warmed up
  outside the timed region);
* ``rotate+flex(torch.compile)`` (frame-causal cases): the same rotation, then
  ``torch.compile(flex_attention)`` with a ``create_block_mask`` block mask of the frame-causal
  rule (built outside the timed region): what block-causal video models (CausVid,
  Self-Forcing) run. Forward only on CPU (FlexAttention has no CPU backward);
* ``copy``: a copy moving ``bytes_moved`` bytes (fwd: read q, k, v, write out; fwd+bwd: 12x a
  ``[B, S, H, D]`` tensor: + read dout, q, k, v, out, write dq, dk, dv), the bandwidth limit.

Work model (``extra_info``): ``flops`` = 4 * B * H * S^2 * D for the forward (S^2: the number of
(query, key) pairs the mask allows), x 3.5 for fwd+bwd (backward = 2.5 x forward); ``tflops`` = flops / median. For one forward
(``torch.autograd.graph.saved_tensors_hooks``): ``activation_bytes`` = memory the saved tensors
keep alive (each distinct storage once and whole: saving ``v``, a view of the fused qkv buffer,
keeps all of it), ``saved_bytes`` = each saved tensor's own bytes per save; ``*_vs_qkvo`` = those
/ bytes of q + k + v + out.

Direction ``jvp``: ``torch.func.jvp`` w.r.t. the fused qkv buffer along a random tangent (the
primal and its tangent: what sCM / MeanFlow training runs through every attention layer).
Contenders there: the kernel backend (its forward-mode path), ``reference`` (jvp of the
materialised softmax; CPU only), ``rotate+sdpa`` on SDPA's math backend (the only one of ATen's
SDPA kernels with a forward-mode derivative) and ``copy`` (read q, k, v and their tangents,
write out and its tangent: 8 tensors); ``torch.compile`` of a jvp takes the reference inside our
op, so it is not a contender there. ``flops`` counts 3x the forward (primal + tangent: two more
score and two more value products).

Paired speedups: in the kernel backend's case, the kernel and a peer are also timed in
interleaved pairs on the same inputs (``common.paired_speedup``; 6 pairs on CPU, 10 on CUDA):
``extra_info["paired_vs_sdpa"]`` (SDPA alone; not in the jvp direction) and
``["paired_vs_rotate_sdpa"]``, the median of ``t_peer / t_kernel``. On the shared 2-core VM two
separately timed medians of the same call drift by up to 30 %; a pair sees one machine state.

Each contender is checked once before timing against ``rotate+sdpa`` in the case's dtype
(outputs, and q/k/v gradients for fwd+bwd). Unavailable contenders are skipped with the reason.

Memory (CUDA, direction ``jvp``): SDPA's math backend computes in fp32 and, under forward AD,
keeps the scores, the probabilities, their tangents and a temporary of the softmax jvp:
``MATH_JVP_MATS`` fp32 ``[B, H, S, S]`` matrices (about 280 GiB at CogVideoX-5B, 240 GiB at
Wan-1.3B). So on CUDA the kernel's jvp is checked on ``CHECK_HEADS`` heads (1 if those do not
fit) of the same sequence, kernel and baseline alike (heads are independent: the same kernel
code, mask and sequence length; ``check_heads`` in ``extra_info``); the ``rotate+sdpa`` jvp
contender and the kernel's ``paired_vs_rotate_sdpa`` peer are skipped with the estimate and the
free memory when they do not fit (``paired_vs_rotate_sdpa_skipped``). A baseline that cannot run
leaves ``check_skipped`` on a contender that can, never a skip that blames the contender. The
case's labels are written before the check and the paired timing, so a row whose later step
fails stays labelled.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import common

OP = "rope3d_attention"
REFERENCE = "reference"
ROT_SDPA = "rotate+sdpa"
ROT_FLASH = "rotate+sdpa-flash"
ROT_CUDNN = "rotate+sdpa-cudnn"
ROT_FA = "rotate+flash-attn"
SDPA = "sdpa"
# flex_attention runs compiled only: the name holds "torch.compile" so that the GPU record's
# plan (benchmarks/gpu.sh) times it with the other compiled contenders, last
ROT_FLEX = "rotate+flex(torch.compile)"
COMPILE, COPY = common.COMPILE, common.COPY
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton",)}
JVP = "jvp"
DIRECTIONS = (*common.DIRECTIONS, JVP)
GiB = common.GiB
# fp32 S x S matrices per head that rotate+sdpa's jvp (SDPA's math backend under forward AD)
# holds at its peak: scores + tangent, probabilities + tangent, a softmax-jvp temporary
MATH_JVP_MATS = 5
CHECK_HEADS = 2  # heads of the jvp correctness check where memory is limited (CUDA)
# (B, text, (F, Hh, Ww), H, D, label[, frames per block of a frame-causal mask])
SHAPES = {
    ("cpu", False): ((1, 16, (4, 16, 16), 4, 64, "4x16x16"), (1, 16, (8, 16, 16), 4, 64, "8x16x16"),
                     (1, 16, (4, 16, 16), 4, 64, "4x16x16-frame-causal", 1)),
    ("cpu", True): ((1, 16, (2, 8, 8), 4, 64, "2x8x8"),
                    (1, 16, (2, 8, 8), 4, 64, "2x8x8-frame-causal", 1)),
    ("cuda", False): ((1, 226, (13, 30, 45), 48, 64, "cogvideox-5b"),
                      (1, 0, (21, 30, 52), 12, 128, "wan-1.3b"),
                      (1, 226, (13, 30, 45), 48, 64, "cogvideox-5b-frame-causal", 1)),
    ("cuda", True): ((1, 32, (4, 16, 16), 8, 64, "4x16x16"),
                     (1, 32, (4, 16, 16), 8, 64, "4x16x16-frame-causal", 1)),
}


def contenders(device: str, direction: str = "fwd") -> tuple[str, ...]:
    if direction == JVP:
        return (*KERNEL_BACKENDS[device], *(() if device == "cuda" else (REFERENCE,)), ROT_SDPA,
                COPY)
    if device == "cuda":
        return (*KERNEL_BACKENDS[device], ROT_SDPA, ROT_FLASH, ROT_CUDNN, ROT_FA, SDPA, COMPILE,
                ROT_FLEX, COPY)
    return (*KERNEL_BACKENDS[device], REFERENCE, ROT_SDPA, SDPA, COMPILE, ROT_FLEX, COPY)


@dataclass(frozen=True)
class Case:
    direction: str
    shape: tuple
    device: str
    dtype: torch.dtype
    contender: str

    @property
    def dims(self):
        B, text, (f, h, w), H, D, *_ = self.shape
        return B, text, f * h * w, H, D

    @property
    def fpb(self):
        """Frames per block of the frame-causal mask; 0: no mask."""
        return self.shape[6] if len(self.shape) > 6 else 0

    def allowed_pairs(self) -> int:
        """(query, key) pairs the mask allows (S^2 without one): text queries see the text, a
        video query of block b the text and blocks 0..b (no text suffix in these shapes)."""
        B, text, L, H, D = self.dims
        if not self.fpb:
            return self.S * self.S
        fb = self.shape[2][1] * self.shape[2][2] * self.fpb
        return text * text + sum(min(fb, L - s0) * (text + min(L, s0 + fb))
                                 for s0 in range(0, L, fb))

    def mask(self):
        """The boolean ``[S, S]`` frame-causal mask (True: attend) or None (for the SDPA
        contenders; 316 MB at the CogVideoX-5B shape)."""
        if not self.fpb:
            return None
        from vidgen_kernels.ops.rope3d_attention import frame_causal_mask
        B, text, L, H, D = self.dims
        tpf = self.shape[2][1] * self.shape[2][2]
        return frame_causal_mask(self.S, text, L, tpf * self.fpb, self.device)

    @property
    def S(self):
        B, text, L, H, D = self.dims
        return text + L

    @property
    def backward(self):
        return self.direction == "fwd+bwd"

    @property
    def group(self):
        B, text, L, H, D = self.dims
        return (f"{OP} {self.direction} {self.shape[5]} B={B} text={text} video={L} H={H} D={D} "
                f"{common.dtype_name(self.dtype)} {self.device}")

    @property
    def id(self):
        B, text, L, H, D = self.dims
        return (f"{OP}-{self.direction}-{self.shape[5]}-B{B}xT{text}xL{L}xH{H}xD{D}-"
                f"{common.dtype_name(self.dtype)}-{self.device}-{self.contender}")


def make_cases(quick, devices):
    return [Case(d, shape, dev, common.DTYPES[dev], c)
            for dev in devices for shape in SHAPES[(dev, quick)] for d in DIRECTIONS
            for c in contenders(dev, d)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def bytes_moved(case: Case) -> int:
    B, _, _, H, D = case.dims
    n = 12 if case.backward else 8 if case.direction == JVP else 4
    return n * B * case.S * H * D * torch.empty((), dtype=case.dtype).element_size()


def flops(case: Case) -> int:
    B, _, _, H, D = case.dims
    f = 4 * B * H * case.allowed_pairs() * D
    return int(f * 3.5) if case.backward else 3 * f if case.direction == JVP else f


# ----------------------------------------------------------------------------------------------
# inputs and contenders
# ----------------------------------------------------------------------------------------------
def rope_tables(case: Case):
    """3D RoPE table of the video ([t | h | w] split as CogVideoX), [L, D/2] and diffusers'
    [L, D] interleaved layout, fp32."""
    _, _, (f, h, w), _, D, *_ = case.shape
    dt, dh = D // 4, 3 * D // 8
    dims = (dt, dh, D - dt - dh)
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w),
                                     indexing="ij"), -1).reshape(-1, 3).double()
    ang = torch.cat([torch.outer(pos[:, a], 1.0 / 10000.0 ** (torch.arange(0, d, 2).double() / d))
                     for a, d in enumerate(dims)], -1)
    cos, sin = ang.cos().float().to(case.device), ang.sin().float().to(case.device)
    return cos, sin, cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)


def make_inputs(case: Case, seed: int) -> dict:
    B, text, L, H, D = case.dims
    g = torch.Generator(device=case.device).manual_seed(1234 + seed)
    qkv = torch.randn(B, case.S, 3, H, D, device=case.device, dtype=case.dtype, generator=g)
    qkv.requires_grad_(case.backward)
    inp = {"qkv": qkv}
    if case.direction == JVP:
        inp["tangent"] = torch.randn(qkv.shape, device=case.device, dtype=case.dtype, generator=g)
    if case.backward:
        inp["dout"] = torch.randn(B, case.S, H, D, device=case.device, dtype=case.dtype, generator=g)
    return inp


def diffusers_rope(x, cos_f, sin_f):
    """diffusers' apply_rotary_emb (use_real_unbind_dim=-1) on [B, H, L, D]: fp32 math."""
    x_real, x_imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], -1).flatten(-2)
    return (x.float() * cos_f + x_rot * sin_f).to(x.dtype)


def _sdpa_ctx(contender, direction="fwd"):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if direction == JVP:  # the one SDPA backend with a forward-mode derivative
        return sdpa_kernel(SDPBackend.MATH)
    if contender == ROT_FLASH:
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    if contender == ROT_CUDNN:
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    import contextlib
    return contextlib.nullcontext()


def op_fn(case: Case, compiled=None):
    """``f(inputs) -> out [B, S, H, D]`` (``compiled``: the torch.compile contender's function)."""
    import vidgen_kernels as vk
    B, text, L, H, D = case.dims
    cos, sin, cos_f, sin_f = rope_tables(case)
    c = case.contender
    mask = None if c in KERNEL_BACKENDS[case.device] or c in (REFERENCE, ROT_FLEX) else case.mask()
    fc = dict(frame_causal=True, tokens_per_frame=case.shape[2][1] * case.shape[2][2],
              frames_per_block=case.fpb) if case.fpb else {}
    if c in KERNEL_BACKENDS[case.device]:
        def f(i):
            q, k, v = i["qkv"].unbind(2)
            return vk.rope3d_attention(q, k, v, cos, sin, rope_offset=text, backend=c, **fc)
        return f
    if c == REFERENCE:
        def f(i):
            q, k, v = i["qkv"].unbind(2)
            return vk.rope3d_attention_reference(q, k, v, cos, sin, rope_offset=text, **fc)
        return f
    if c == SDPA:
        def f(i):
            q, k, v = (t.transpose(1, 2) for t in i["qkv"].unbind(2))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        return f

    def rotate_bhsd(x):
        return torch.cat([x[:, :, :text], diffusers_rope(x[:, :, text:], cos_f, sin_f)], dim=2)

    if c == ROT_FLEX:
        flex, block_mask = _flex(case)

        def f(i):
            q, k, v = (t.transpose(1, 2) for t in i["qkv"].unbind(2))
            q, k = rotate_bhsd(q), rotate_bhsd(k)
            return flex(q, k, v, block_mask=block_mask).transpose(1, 2)
        return f

    if c == ROT_FA:
        from flash_attn import flash_attn_func

        def f(i):
            q, k, v = (t.transpose(1, 2) for t in i["qkv"].unbind(2))
            q, k = rotate_bhsd(q), rotate_bhsd(k)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return f

    def f(i):
        q, k, v = (t.transpose(1, 2) for t in i["qkv"].unbind(2))
        q, k = rotate_bhsd(q), rotate_bhsd(k)
        with _sdpa_ctx(c, case.direction):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if c == COMPILE:
        return compiled if compiled is not None else f
    return f


_BLOCK_MASK: dict = {}  # the last case's: (S, text, block tokens, device) -> BlockMask


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _flex(case: Case):
    """``(torch.compile(flex_attention), block mask)`` of a frame-causal case: the mask is
    ``create_block_mask`` of the frame-causal rule (text queries see the text; a video query of
    block b the text and blocks 0..b), made outside the timed region, as a user of FlexAttention
    would (CausVid / Self-Forcing build their block-causal masks so)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, text, L, H, D = case.dims
    fb = case.shape[2][1] * case.shape[2][2] * case.fpb

    def frame_causal(b, h, q_idx, kv_idx):
        return (kv_idx < text) | ((q_idx >= text) & ((kv_idx - text) // fb <= (q_idx - text) // fb))

    key = (case.S, text, fb, case.device)
    if key not in _BLOCK_MASK:
        _BLOCK_MASK.clear()
        _BLOCK_MASK[key] = create_block_mask(frame_causal, None, None, case.S, case.S,
                                             device=case.device)
    return _compiled_flex(), _BLOCK_MASK[key]


def _jvp(f, inp):
    return torch.func.jvp(lambda qkv: f(dict(inp, qkv=qkv)), (inp["qkv"],), (inp["tangent"],))


def step_fn(case: Case, f, inp):
    if case.direction == JVP:
        return lambda: _jvp(f, inp)
    if not case.backward:
        return lambda: f(inp)
    return lambda: torch.autograd.grad(f(inp), (inp["qkv"],), inp["dout"])


def _results(case, f, inp):
    if case.direction == JVP:
        return list(_jvp(f, inp))
    out = f(inp)
    res = [out]
    if case.backward:
        res += list(torch.autograd.grad(out, (inp["qkv"],), inp["dout"]))
    return [t.detach() for t in res]


def saved_bytes(f, inp) -> dict:
    leaf = inp["qkv"].detach().requires_grad_()
    return common.count_saved_bytes(lambda: f(dict(inp, qkv=leaf)))


def math_jvp_bytes(case: Case, heads: Optional[int] = None) -> int:
    """Estimate of what ``rotate+sdpa``'s jvp (math backend) allocates on ``heads`` heads (all
    of the case's by default): ``MATH_JVP_MATS`` fp32 S x S matrices per head, plus the boolean
    mask and its fp32 additive form where the case is frame-causal."""
    B, text, L, H, D = case.dims
    h = H if heads is None else heads
    return MATH_JVP_MATS * B * h * case.S ** 2 * 4 + (5 * case.S ** 2 if case.fpb else 0)


def no_room(what: str, need: int, device: str):
    """:func:`common.no_room` with this file's memory estimate named."""
    return common.no_room(what, need, device, f"{MATH_JVP_MATS} fp32 S x S matrices per head")


def _unavailable(case: Case):
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in KERNEL_BACKENDS[case.device]:
        from vidgen_kernels.backends import why_unavailable
        return why_unavailable(case.contender, case.device)
    if case.contender == ROT_FA and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    if case.contender == ROT_FA and case.fpb:
        return "flash_attn_func has no block-causal mask"
    if case.contender == ROT_FLEX:
        if not case.fpb:
            return ("flex_attention is the peer of the frame-causal (block-mask) cases; "
                    "unmasked attention is SDPA's")
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "this torch has no torch.nn.attention.flex_attention"
        if case.device == "cpu" and case.backward:
            return "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
    return None


_BASELINE: dict = {}


class BaselineUnavailable(Exception):
    """The check's ``rotate+sdpa`` baseline cannot run (its memory estimate exceeds the free
    memory, or it raised: out of memory, ...): the contender is not at fault; its row is timed
    with ``check_skipped`` instead of being skipped."""


def _with_heads(case: Case, heads: int) -> Case:
    B, text, fhw, H, D, *rest = case.shape
    return dataclasses.replace(case, shape=(B, text, fhw, heads, D, *rest))


def check_case(case: Case) -> Case:
    """The case the correctness check runs: the case itself, except in the jvp direction where
    memory is limited (CUDA): the same sequence, mask and head size on ``CHECK_HEADS`` heads (1
    if those do not fit), since the math-backend baseline does not fit at the full head count.
    The heads of attention are independent, so this checks the same kernel code on the same
    sequence. Raises :class:`BaselineUnavailable` when not even one head fits."""
    if case.direction != JVP or common.free_bytes(case.device) is None:
        return case
    why = None
    for h in dict.fromkeys((min(CHECK_HEADS, case.dims[3]), 1)):
        why = no_room(f"the rotate+sdpa jvp baseline on {h} head(s)",
                      math_jvp_bytes(case, h), case.device)
        if why is None:
            return _with_heads(case, h)
    raise BaselineUnavailable(why)


def check(case: Case, f, inp, info: dict):
    """Max relative error of the contender ``f`` against ``rotate+sdpa`` (on
    :func:`check_case`'s case: ``check_heads`` goes into ``info`` when that is a slice of the
    heads). A failure of the baseline raises :class:`BaselineUnavailable` (remembered for the
    group's other contenders: not retried), a failure of the contender its own exception."""
    if case.contender in (ROT_SDPA, COPY):
        return 0.0
    sub = check_case(case)
    if sub is not case:
        info["check_heads"] = sub.dims[3]
        inp = make_inputs(sub, 0)  # (the baseline's inputs: same seed, same shape)
    key = sub.group
    if key not in _BASELINE:
        _BASELINE.clear()
        base = dataclasses.replace(sub, contender=ROT_SDPA)
        failed = None
        try:
            _BASELINE[key] = _results(base, op_fn(base), make_inputs(base, 0))
        except RuntimeError as e:  # (torch.OutOfMemoryError included)
            failed = f"the rotate+sdpa baseline failed: {type(e).__name__}: {str(e)[:200]}"
        if failed is not None:
            common.free_after_oom(case.device)
            _BASELINE[key] = BaselineUnavailable(failed)
    want = _BASELINE[key]
    if isinstance(want, BaselineUnavailable):
        raise want
    if case.contender == SDPA:  # no RoPE: a different function, nothing to compare
        return None
    return common.assert_rel_err(case, _results(case, f, inp), want, ROT_SDPA)


PAIR_PEERS = {"paired_vs_sdpa": SDPA, "paired_vs_rotate_sdpa": ROT_SDPA}


def _pair_peers(case: Case, sets: list) -> tuple[dict, dict]:
    """``({extra_info key: peer call}, notes)`` for the kernel backends' interleaved-pair
    speedups, on the same input sets: vs SDPA alone (the CPU target: forward within 1.1x of it)
    and vs rotation + SDPA (the GPU targets), where the direction has that contender. A peer
    that does not fit the free memory (the jvp's math backend on CUDA) or fails its warm-up is
    left out with a note (``<key>_skipped`` / ``<key>_error``)."""
    out, notes = {}, {}
    for key, peer in PAIR_PEERS.items():
        pc = dataclasses.replace(case, contender=peer)
        if peer in contenders(case.device, case.direction) and _unavailable(pc) is None:
            if case.direction == JVP:
                why = no_room("the rotate+sdpa jvp peer", math_jvp_bytes(pc), case.device)
                if why is not None:
                    notes[key + "_skipped"] = why
                    continue
            f = op_fn(pc)
            call = common.rotate([step_fn(pc, f, s) for s in sets])
            try:
                call()  # warm-up
                out[key] = call
            except RuntimeError as e:  # (torch.OutOfMemoryError included)
                notes[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if key + "_error" in notes:
                del call, f
                common.free_after_oom(case.device)
    return out, notes


def test_rope3d_attention(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")
    quick = request.config.getoption("--quick")
    if quick and case.contender == COMPILE:
        pytest.skip("--quick: torch.compile contender skipped (compiling takes 5-30 s per case)")
    pol = common.heavy_policy(quick, case.device)
    B, text, L, H, D = case.dims
    nbytes = bytes_moved(case)
    fl = None if case.contender == COPY else flops(case)
    # the labels first: a later step that fails still leaves a labelled row
    info, peers = benchmark.extra_info, {}
    info.update(
        op=OP, direction=case.direction, contender=case.contender, shape_label=case.shape[5],
        shape=dict(B=B, text=text, video=L, S=case.S, H=H, D=D), dtype=common.dtype_name(case.dtype),
        device=case.device, device_name=common.device_name(case.device),
        flops=fl, matmul_peak_flops=fl and common.matmul_peak_flops(case.device, case.dtype),
        flops_counted=("4*B*H*P*D, P = the (query, key) pairs the frame-causal mask "
                                 "allows (masked pairs not counted)" if case.fpb else
                                 "4*B*H*S^2*D") + (" * 3.5 (fwd+bwd)" if case.backward else
                                                 " * 3 (jvp: primal + tangent)"
                                                 if case.direction == JVP else ""),
        bytes_moved=nbytes,
    )
    if case.contender == COPY:
        n_sets = common.rotation_sets(nbytes, case.device)
        steps = [common.copy_bytes_step(nbytes, case.dtype, case.device, i) for i in range(n_sets)]
    else:
        esz = torch.empty((), dtype=case.dtype).element_size()
        set_bytes = (5 if case.backward else 6 if case.direction == JVP else 3) * B * case.S * H * D * esz
        sets = [make_inputs(case, i) for i in range(common.rotation_sets(set_bytes, case.device))]
        n_sets = len(sets)
        if case.direction == JVP and case.contender == ROT_SDPA:
            why = no_room("rotate+sdpa jvp (SDPA's math backend, fp32)", math_jvp_bytes(case),
                          case.device)
            if why is not None:
                del sets
                pytest.skip(why)
        compiled = None
        if case.contender == COMPILE:
            compiled, info["compile_s"] = common.compile_contender(
                op_fn(case), lambda c: step_fn(case, c, sets[0])(), case.device)
        f = op_fn(case, compiled)
        why = None
        try:
            info["max_rel_err_vs_rotate_sdpa"] = check(case, f, sets[0], info)
        except BaselineUnavailable as e:  # the baseline's failure: the contender still runs
            info["check_skipped"] = str(e)
        except RuntimeError as e:  # e.g. a forced SDPA backend that cannot run this shape / GPU
            why = f"{case.contender} cannot run this case: {type(e).__name__}: {str(e)[:200]}"
        if why is not None:  # (outside the except: its traceback keeps the failed call's tensors)
            del sets, f, compiled
            common.release(case.device, case.contender == COMPILE)
            pytest.skip(why)
        if case.direction != JVP and not (case.contender == ROT_FLEX and case.device == "cpu"):
            info.update(saved_bytes(f, sets[0]))  # (flex on CPU: no input may require grad)
            qkvo = 4 * B * case.S * H * D * esz
            info["saved_bytes_vs_qkvo"] = info["saved_bytes"] / qkvo
            info["activation_bytes_vs_qkvo"] = info["activation_bytes"] / qkvo
        steps = [step_fn(case, f, s) for s in sets]
        if case.contender in KERNEL_BACKENDS[case.device]:
            peers, notes = _pair_peers(case, sets)
            info.update(notes)
        del sets
    info["input_sets"] = n_sets
    call = common.rotate(steps)
    common.measure(benchmark, request, call, case.device, pol, case.id, info)
    info["tflops"] = common.per_second(fl, info, 1e12)[0]
    for key, peer_call in peers.items():
        pairs = 1 if quick else (10 if case.device == "cuda" else 6)
        try:
            info.update(common.paired_speedup(call, peer_call, case.device, pairs, key))
        except RuntimeError as e:  # a peer that cannot run this shape: the kernel's row stays
            info[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if key + "_error" in info:  # (torch.OutOfMemoryError is a RuntimeError)
            common.free_after_oom(case.device)
    del peers
    del call, steps
    common.release(case.device, case.contender == COMPILE)


def test_work_model():
    c = Case("fwd+bwd", (1, 226, (13, 30, 45), 48, 64, "x"), "cuda", torch.bfloat16, "triton")
    assert c.S == 17776 and flops(c) == int(4 * 48 * 17776 ** 2 * 64 * 3.5)
    assert math.isclose(flops(c) / flops(Case("fwd", *list(c.__dict__.values())[1:])), 3.5)
    m = Case("fwd", (1, 2, (3, 1, 2), 1, 8, "x", 1), "cpu", torch.float32, "cpu")
    # text sees the 2 text tokens; frame f's 2 tokens see text + frames <= f
    assert flops(m) == 4 * 8 * (2 * 2 + 2 * (2 + 2) + 2 * (2 + 4) + 2 * (2 + 6))
    for shape in ((1, 26, (13, 6, 5), 2, 8, "x", 1), (1, 5, (7, 3, 2), 1, 8, "x", 3)):
        c = Case("fwd", shape, "cpu", torch.float32, "cpu")
        assert c.allowed_pairs() == int(c.mask().sum())
