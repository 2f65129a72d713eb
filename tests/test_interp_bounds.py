"""The test aid that bounds-checks every load and store of Triton's interpreter (interp_bounds.py).

With it installed (tests/conftest.py, whenever the Triton kernels run in the interpreter), each
Triton test also checks that the kernel touches no memory outside its tensor arguments: what a
GPU would answer with an illegal memory access or a silent foreign read / write.
"""
import os

import pytest
import torch

import interp_bounds

pytestmark = pytest.mark.triton


@pytest.fixture
def copy_kernel():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on a GPU here, not in the interpreter")
    assert interp_bounds.check() is None, interp_bounds.check()
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, n_load, n_store, sx, sy, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(X + i * sx, mask=i < n_load, other=0.0)
        tl.store(Y + i * sy, v, mask=i < n_store)

    return _copy


def _raises_oob(fn, needle):
    with pytest.raises(Exception) as ei:
        fn()
    assert interp_bounds.is_out_of_bounds(ei.value), ei.value
    assert needle in str(ei.value), str(ei.value)


def test_in_bounds_accesses_pass(copy_kernel):
    """Masked lanes past the end are not accesses; strided views are checked over their extent;
    two views of one buffer side by side are one extent."""
    x, y = torch.arange(10.0), torch.zeros(10)
    copy_kernel[(1,)](x, y, 10, 10, 1, 1, BLOCK=16)
    assert torch.equal(x, y)
    buf = torch.arange(20.0)
    a, b = buf[:10], buf[10:]
    out = torch.zeros(5)
    copy_kernel[(1,)](a[::2], out, 5, 5, 2, 1, BLOCK=8)  # every other element of a
    assert torch.equal(out, a[::2])
    # reads a[0..11]: a and the first two of b, both arguments (one extent)
    copy_kernel[(1,)](a, b, 12, 5, 1, 1, BLOCK=16)
    assert torch.equal(buf[10:15], torch.arange(5.0))


def test_load_past_a_view_raises(copy_kernel):
    """One element past a tensor, and past a slice of a larger buffer (no fault on a GPU there,
    but another tensor's data), raise naming the kernel and the argument."""
    x, y = torch.arange(10.0), torch.zeros(16)
    _raises_oob(lambda: copy_kernel[(1,)](x, y, 11, 10, 1, 1, BLOCK=16),
                "_copy: load of 4 byte(s)")
    buf = torch.arange(32.0)
    _raises_oob(lambda: copy_kernel[(1,)](buf[:10], y, 11, 10, 1, 1, BLOCK=16),
                "4 bytes past the end of argument 'X'")
    # a strided view's extent ends at its last element
    _raises_oob(lambda: copy_kernel[(1,)](buf[:16:2], y, 9, 8, 2, 1, BLOCK=16),
                "past the end of argument 'X'")


def test_store_past_a_view_raises(copy_kernel):
    x, y = torch.arange(16.0), torch.zeros(10)
    _raises_oob(lambda: copy_kernel[(1,)](x, y, 16, 12, 1, 1, BLOCK=16), "_copy: store")
    empty = torch.zeros(0)
    _raises_oob(lambda: copy_kernel[(1,)](x, empty, 16, 1, 1, 1, BLOCK=16), "_copy: store")


def test_kernel_bug_is_caught_by_the_suite(monkeypatch, tmp_path):
    """The checker guards the package's kernels: the grouped GEMM with its row mask one row too
    permissive (a tile reads the row after its expert's last: past the end of the input for the
    last expert) raises at the first launch, where the interpreter alone read host memory."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on a GPU here, not in the interpreter")
    import importlib.util

    import vidgen_kernels as vk
    from vidgen_kernels.triton_kernels import moe as tm
    g = torch.Generator().manual_seed(0)
    N, C, F, E = 11, 8, 16, 3
    x = torch.randn(N, C, generator=g)
    logits = torch.randn(N, E, generator=g)
    w1, w2 = torch.randn(E, C, F, generator=g), torch.randn(E, F, C, generator=g)
    vk.moe_ffn(x, logits, w1, w2, top_k=2, backend="triton")  # in bounds
    with open(tm.__file__) as f:
        src = f.read()
    assert src.count("rmask = rows < end\n") == 1
    path = tmp_path / "moe_mutant.py"
    path.write_text(src.replace("rmask = rows < end\n", "rmask = rows < end + 1\n"))
    spec = importlib.util.spec_from_file_location("vidgen_kernels.triton_kernels._moe_mutant", path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    monkeypatch.setattr(tm, "_gmm_kernel", mutant._gmm_kernel)
    _raises_oob(lambda: vk.moe_ffn(x, logits, w1, w2, top_k=2, backend="triton"),
                "_gmm_kernel: load")
