"""Triton's interpreter made to compute as a GPU does (a test aid; never used by the package).

1. bfloat16. The interpreter (``TRITON_INTERPRET=1``) keeps bfloat16 values as their raw
   ``uint16`` bits and hands those bits to numpy unchanged, so on bf16 operands ``tl.dot``
   multiplies integers, ``+`` / ``*`` / ``-x`` are integer arithmetic, and its float32 ->
   bfloat16 cast truncates (a GPU rounds to nearest even). :func:`install` patches the
   interpreter's builder so that every such operation decodes the bits to float32, computes
   there, and rounds the float results back to bfloat16 with round-to-nearest-even, which is what
   the hardware does: bf16 x bf16 products are exact in fp32 and a tensor-core dot accumulates
   them in fp32; a single bf16 add or multiply done in fp32 and rounded once gives the correctly
   rounded bf16 result. With it the Triton kernels' bf16 paths (tensor-core dots on bf16 tiles,
   bf16 stores) run on the CPU against the references. Not patched: reductions and scans over
   bf16 tensors (``tl.sum`` / ``tl.max`` of a bf16 block, still integer math in the interpreter)
   and atomics; this package's kernels reduce in fp32.
2. Scalars as loop bounds. The interpreter holds a scalar tensor as a one-element array, and
   before Triton 3.7 its ``__index__`` (``range(0, n)`` over a computed ``n``) is
   ``int(array)``, which NumPy >= 2.5 refuses for arrays that are not 0-d ("only 0-dimensional
   arrays can be converted to Python scalars"); on a GPU the same loop compiles. :func:`install`
   makes ``__index__`` read the single element, as later Tritons do.

:func:`check` runs a few tiny kernels (dot, casts with ties and NaN, elementwise ops, a
comparison, a loop over a computed bound) against torch and returns ``None`` or the reason the
patch cannot be trusted with this Triton version; the tests skip their bf16 interpreter cases
with that reason.
"""
from __future__ import annotations

import functools

import numpy as np

_BITWISE = (np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.left_shift, np.right_shift)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Raw bf16 bits (``uint16``) -> exact float32 values."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN of the same sign."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    b = f.view(np.uint32)
    out = ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((b[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


@functools.lru_cache(maxsize=None)
def install() -> bool:
    """Patch ``triton.runtime.interpreter`` (``InterpreterBuilder``'s bf16 paths, scalar
    ``__index__``; once per process). Returns whether the builder had the methods this patches
    (False: nothing was changed)."""
    import triton.language as tl
    from triton.runtime import interpreter as it

    B = getattr(it, "InterpreterBuilder", None)
    TH = getattr(it, "TensorHandle", None)
    names = ("cast_impl", "create_fp_to_fp", "create_dot", "binary_op", "unary_op", "create_fma")
    if B is None or TH is None or not all(hasattr(B, n) for n in names):
        return False
    patch_tensor = getattr(it, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        def _patch_lang_tensor(tensor, scope, *args, **kwargs):
            patch_tensor(tensor, scope, *args, **kwargs)
            scope.set_attr(tensor, "__index__",
                           lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
        it._patch_lang_tensor = _patch_lang_tensor
    bf16 = tl.bfloat16
    orig = {n: getattr(B, n) for n in names}

    def is_bf16(h) -> bool:
        return h.dtype.scalar == bf16

    def as_f32(self, h):
        """A float32 handle holding h's values (bf16 decoded, other dtypes cast)."""
        if is_bf16(h):
            return TH(bf16_bits_to_f32(h.data), tl.float32)
        if h.dtype.scalar == tl.float32:
            return h
        return orig["cast_impl"](self, h, tl.float32)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == bf16 and d != bf16:
            f = TH(bf16_bits_to_f32(src.data), tl.float32)
            return f if d == tl.float32 else orig["cast_impl"](self, f, dst_type)
        if d == bf16 and s != bf16:
            return TH(f32_to_bf16_bits(as_f32(self, src).data), bf16)
        return orig["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_bf16(src) or dst_type.scalar == bf16:
            return cast_impl(self, src, dst_type)
        return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) or is_bf16(b):
            a, b = as_f32(self, a), as_f32(self, b)
            if is_bf16(d):  # a bf16 accumulator: fp32 math, one rounding at the end
                acc = np.matmul(a.data, b.data, dtype=np.float32) + bf16_bits_to_f32(d.data)
                return TH(f32_to_bf16_bits(acc), bf16)
        return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if (is_bf16(lhs) or is_bf16(rhs)) and op not in _BITWISE:
            out = op(as_f32(self, lhs).data, as_f32(self, rhs).data)
            if out.dtype == np.float32:  # arithmetic: back to bf16; comparisons stay bool
                out = f32_to_bf16_bits(out)
            return TH(out, lhs.dtype.scalar)
        return orig["binary_op"](self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if is_bf16(arg):
            out = op(bf16_bits_to_f32(arg.data))
            return TH(f32_to_bf16_bits(out) if out.dtype == np.float32 else out, bf16)
        return orig["unary_op"](self, arg, op)

    def create_fma(self, x, y, z):
        if is_bf16(z):
            f = [as_f32(self, h).data.astype(np.float64) for h in (x, y, z)]
            return TH(f32_to_bf16_bits((f[0] * f[1] + f[2]).astype(np.float32)), bf16)
        return orig["create_fma"](self, x, y, z)

    for n, fn in (("cast_impl", cast_impl), ("create_fp_to_fp", create_fp_to_fp),
                  ("create_dot", create_dot), ("binary_op", binary_op),
                  ("unary_op", unary_op), ("create_fma", create_fma)):
        setattr(B, n, fn)
    return True


@functools.lru_cache(maxsize=None)
def check() -> str | None:
    """``None`` when bf16 kernels and computed loop bounds run correctly in this process's
    interpreter (after :func:`install`), else the reason they do not."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (these checks are for the interpreter)"
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - triton absent
        return f"triton not importable ({e})"
    if not install():
        return "this Triton's interpreter has no InterpreterBuilder methods to patch"

    @triton.jit
    def _dot(a_ptr, b_ptr, acc_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :])
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, acc))

    @triton.jit
    def _loop(o_ptr, n_total, R: tl.constexpr):
        n = tl.minimum(n_total - 2, R).to(tl.int32)  # a computed scalar as the loop bound
        acc = 0.0
        for i in range(0, n):
            acc += i
        tl.store(o_ptr, acc)

    @triton.jit
    def _elem(x_ptr, y_ptr, f_ptr, o_ptr, n: tl.constexpr):
        r = tl.arange(0, n)
        x = tl.load(x_ptr + r)
        y = tl.load(y_ptr + r)
        f = tl.load(f_ptr + r)
        tl.store(o_ptr + r, f.to(tl.bfloat16))                       # rounding
        tl.store(o_ptr + n + r, x + y)                                 # bf16 add
        tl.store(o_ptr + 2 * n + r, x * y)                             # bf16 mul
        tl.store(o_ptr + 3 * n + r, -x)                                # bf16 neg
        tl.store(o_ptr + 4 * n + r, tl.where(x > y, x, y))             # compare + select
        tl.store(o_ptr + 5 * n + r, (x.to(tl.float32) * 3.0).to(tl.bfloat16))

    loop = torch.zeros(1)
    try:
        _loop[(1,)](loop, 7, 8)
    except Exception as e:  # noqa: BLE001 - any failure means the patch does not hold
        return f"a loop over a computed scalar bound fails in the interpreter: {e}"
    if loop.item() != 10.0:
        return f"a loop over a computed scalar bound gave {loop.item()}, expected 10"
    g = torch.Generator().manual_seed(0)
    M = N = K = 16
    a = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(K, N, generator=g).bfloat16()
    acc = torch.randn(M, N, generator=g)
    c = torch.empty(M, N)
    _dot[(1,)](a, b, acc, c, M, N, K)
    ref = (a.double() @ b.double() + acc.double()).float()
    if not torch.allclose(c, ref, rtol=1e-5, atol=1e-5):
        return f"bf16 tl.dot off by {(c - ref).abs().max().item():.3g} after the patch"
    n = 64
    x = torch.randn(n, generator=g).bfloat16()
    y = torch.randn(n, generator=g).bfloat16()
    # ties (exactly half an ulp), NaN, inf and values either side of a tie
    f = torch.randn(n, generator=g)
    f[:4] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, float("nan"), float("-inf")])
    o = torch.empty(6 * n, dtype=torch.bfloat16)
    _elem[(1,)](x, y, f, o, n)
    want = torch.cat([f.bfloat16(), x + y, x * y, -x, torch.maximum(x, y),
                      (x.float() * 3.0).bfloat16()])
    same = (o.view(torch.int16) == want.view(torch.int16)) | (o.isnan() & want.isnan())
    if not bool(same.all()):
        bad = int((~same).nonzero()[0])
        return (f"bf16 elementwise op {bad // n} differs from torch at element {bad % n}: "
                f"{o[bad].item()} vs {want[bad].item()}")
    return None
