"""The test aid that bounds- and race-checks every load and store of Triton's interpreter
(interp_memcheck.py).

With it installed (tests/conftest.py, whenever the Triton kernels run in the interpreter), each
Triton test also checks that the kernel touches no memory outside its tensor arguments (what a
GPU would answer with an illegal memory access or a silent foreign read / write) and that no two
programs of a launch touch one byte with a store among them (a race on a GPU, where programs
run concurrently; the interpreter runs them one after another).
"""
import os

import pytest
import torch

import interp_memcheck

pytestmark = pytest.mark.triton


@pytest.fixture
def copy_kernel():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on a GPU here, not in the interpreter")
    assert interp_memcheck.check() is None, interp_memcheck.check()
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
    assert interp_memcheck.is_out_of_bounds(ei.value), ei.value
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


def _moe_case():
    g = torch.Generator().manual_seed(0)
    N, C, F, E = 11, 8, 80, 3  # F: several column blocks of the interpreter's tiles
    return (torch.randn(N, C, generator=g), torch.randn(N, E, generator=g),
            torch.randn(E, C, F, generator=g), torch.randn(E, F, C, generator=g))


def _mutant_gmm(monkeypatch, tmp_path, old, new):
    """The package's grouped-GEMM kernel with ``old`` replaced by ``new`` in its source (a
    module beside the real one, so the interpreter can read the kernel's source)."""
    import importlib.util

    from vidgen_kernels.triton_kernels import moe as tm
    with open(tm.__file__) as f:
        src = f.read()
    assert src.count(old) == 1, old
    path = tmp_path / "moe_mutant.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location("vidgen_kernels.triton_kernels._moe_mutant", path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    monkeypatch.setattr(tm, "_gmm_kernel", mutant._gmm_kernel)


@pytest.mark.parametrize("old,new,needle", [
    # the row mask one row too permissive: a tile reads the row after its expert's last, past
    # the end of the input for the last expert
    ("rmask = rows < end\n", "rmask = rows < end + 1\n", "_gmm_kernel: load"),
    # every program of a launch group on column block 0: programs share output tiles
    ("pid_n = (pid % per_group) // size\n", "pid_n = 0 * pid\n", "write-write race"),
])
def test_kernel_bug_is_caught_by_the_suite(monkeypatch, tmp_path, old, new, needle):
    """The checks guard the package's kernels: grouped-GEMM mutants raise at their first
    launch (an out-of-bounds read; two programs storing one tile), where the interpreter alone
    read host memory, or ran the racing programs one after the other."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on a GPU here, not in the interpreter")
    import vidgen_kernels as vk
    x, logits, w1, w2 = _moe_case()
    vk.moe_ffn(x, logits, w1, w2, top_k=2, backend="triton")  # the real kernel: no finding
    _mutant_gmm(monkeypatch, tmp_path, old, new)
    with pytest.raises(Exception) as ei:
        vk.moe_ffn(x, logits, w1, w2, top_k=2, backend="triton")
    assert interp_memcheck.is_out_of_bounds(ei.value) or interp_memcheck.is_data_race(ei.value)
    assert needle in str(ei.value), str(ei.value)


def test_races_between_programs_raise(copy_kernel):
    """A program reading what another program of the launch stores (either order), or two
    programs storing one location, is a race; disjoint programs and a program rereading its own
    stores are not."""
    import triton
    import triton.language as tl

    @triton.jit
    def _neighbour(X, Y, OFF: tl.constexpr, READ_Y: tl.constexpr):
        p = tl.program_id(0)
        v = tl.load(X + p)
        if READ_Y:
            v += tl.load(Y + p + OFF)
        tl.store(Y + p, v)

    x, y = torch.arange(4.0), torch.zeros(5)
    _neighbour[(4,)](x, y, OFF=0, READ_Y=True)  # reads its own y[p]: fine
    _neighbour[(4,)](x, y, OFF=0, READ_Y=False)
    with pytest.raises(Exception) as ei:
        _neighbour[(4,)](x, y, OFF=1, READ_Y=True)  # reads y[p + 1], which program p + 1 stores
    assert interp_memcheck.is_data_race(ei.value) and "read-write race" in str(ei.value)
    assert "argument 'Y'" in str(ei.value)

