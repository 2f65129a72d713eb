"""Bounds and race checking of every Triton load and store run by the interpreter (a test aid).

On a GPU, a load or store whose mask lets through an address outside the tensors a kernel was
given is an illegal memory access (the CUDA context dies) or, inside some other allocation of
the caching allocator, a silent read of foreign data or a corrupting write. Triton's interpreter
(``TRITON_INTERPRET=1``, how the Triton kernels run in the CPU test suite) performs such an
access on host memory without a word. :func:`install` makes it check instead: while a kernel
runs, every address a load or store touches with its mask on (each element's whole width) must
lie within the extent of one of the kernel's tensor arguments, ``[data_ptr, data_ptr + bytes
spanned by its sizes and strides)`` (views of one buffer merge); anything else raises
:class:`OutOfBoundsAccess` naming the kernel, the access and the nearest argument. The extent is
the view, not the whole storage: a read past a slice of a larger buffer is caught although it
would not fault, unless it lands in another argument (q, k and v sliced from one fused qkv
buffer and all passed make one extent). Not checked: addresses between the elements of a
strided view (inside its extent), masked-off lanes (never accessed, as on the GPU), and launches
with a tensor not on the CPU (``TRITON_INTERPRET=1`` on a GPU machine: the interpreter copies it
to host memory at addresses unknown here). Atomics and tensor descriptors are not handled (no
kernel of this package uses them): an atomic read-modify-write is not bounds-checked, an atomic
load / store would count as a race, a descriptor's load as out of bounds.

Races. The interpreter runs a launch's programs one after another, so a kernel in which one
program writes a location that another program of the same launch reads or writes gives the
same answer every time there; on a GPU the programs run concurrently in no set order and the
answer depends on timing. At the end of each launch (the kernels here use no atomics) every
byte stored is checked: stored by two programs (write-write), or stored by one and loaded by
another (read-write, either order), raises :class:`DataRace` naming the kernel, the address,
the argument and the two programs. A program reading back its own stores is fine.

:func:`check` proves on tiny kernels that an access one element past the end raises, the masked
form passes, and a cross-program write-read or write-write raises; :func:`install` installs
nothing (returns the reason) when the interpreter lacks the hooks this wraps.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

# The running launch: .kernel (name), .spans ((lo, hi, name) of its tensor arguments; None:
# unchecked), .merged (their union, see _merge), .loads ((element addresses, width, program) of
# each load so far), .stores ((byte addresses, program) of each store so far)
_STATE = threading.local()


class OutOfBoundsAccess(AssertionError):
    """A Triton kernel under the interpreter touched memory outside its tensor arguments."""


class DataRace(AssertionError):
    """Two programs of one Triton launch touched the same byte, at least one of them storing."""


def _caused_by(e: BaseException, cls) -> bool:
    """Whether ``e`` or one of its causes (the interpreter re-raises a kernel's exception as
    ``InterpreterError(repr(e))`` from it) is a ``cls``."""
    while e is not None:
        if isinstance(e, cls):
            return True
        e = e.__cause__
    return False


def is_out_of_bounds(e: BaseException) -> bool:
    """Whether ``e`` is (the interpreter's re-raise of) an :class:`OutOfBoundsAccess`."""
    return _caused_by(e, OutOfBoundsAccess)


def is_data_race(e: BaseException) -> bool:
    """Whether ``e`` is (the interpreter's re-raise of) a :class:`DataRace`."""
    return _caused_by(e, DataRace)


def _tensor_span(t):
    """``(lo, hi)`` byte addresses of the elements a tensor view spans; None if it has none."""
    if t.numel() == 0:
        return None
    lo = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def _spans(names, args, kwargs):
    """``[(lo, hi, name)]`` of the tensor arguments; None if one is not on the CPU."""
    import torch
    names = list(names or [])
    out = []

    def add(name, a):
        a = getattr(a, "base", a)  # TensorWrapper (reinterpreted dtype)
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                raise _NotOnHost
            s = _tensor_span(a)
            if s is not None:
                out.append((s[0], s[1], name))
        elif isinstance(a, tuple):
            for i, x in enumerate(a):
                add(f"{name}[{i}]", x)

    try:
        for i, a in enumerate(args):
            add(names[i] if i < len(names) else f"arg{i}", a)
        for k, a in kwargs.items():
            add(k, a)
    except _NotOnHost:
        return None
    return out


class _NotOnHost(Exception):
    pass


def _check_access(builder, ptrs, mask, kind):
    spans = getattr(_STATE, "spans", None)
    if spans is None:  # not inside a kernel launched through GridExecutor
        return
    import triton.language as tl
    addr = np.asarray(ptrs.data)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[m]
    addr = addr.ravel().astype(np.uint64)
    if addr.size == 0:
        return
    ety = ptrs.get_element_ty()
    width = max(1, getattr(ety, "primitive_bitwidth", 8) // 8) if not isinstance(
        ety, tl.pointer_type) else 8
    los, his = _STATE.merged
    if los.size:
        i = np.searchsorted(los, addr, side="right").astype(np.int64) - 1
        ok = (i >= 0) & (addr + np.uint64(width) <= his[np.maximum(i, 0)])
    else:  # no argument has an element
        ok = np.zeros(addr.shape, dtype=bool)
    if ok.all():
        x, y, z = getattr(builder, "grid_idx", None) or (0, 0, 0)
        pid = int(x) | (int(y) << 21) | (int(z) << 42)
        if kind == "load":  # element addresses (a load is checked against stored bytes)
            _STATE.loads.append((np.unique(addr), width, pid))
        else:
            _STATE.stores.append(((addr[:, None] + np.arange(width, dtype=np.uint64)).ravel(), pid))
        return
    bad = int(addr[~ok][0])
    if not spans:
        raise OutOfBoundsAccess(f"{_STATE.kernel}: {kind} of {width} byte(s) at {hex(bad)}, but "
                                f"no tensor argument of the launch has an element")
    near = min(spans, key=lambda s: 0 if s[0] <= bad < s[1] else min(abs(bad - s[0]),
                                                                       abs(bad - s[1])))
    lo, hi, name = near
    where = (f"{lo - bad} bytes before" if bad < lo else f"{bad + width - hi} bytes past the end of"
             if bad + width > hi else "inside (but running past)")
    raise OutOfBoundsAccess(
        f"{_STATE.kernel}: {kind} of {width} byte(s) at {hex(bad)}, {where} argument {name!r} "
        f"([{hex(lo)}, {hex(hi)}), {hi - lo} bytes); {int((~ok).sum())} of {addr.size} active "
        f"lanes outside every tensor argument")


def _merge(spans):
    """The union of the arguments' extents as disjoint sorted intervals ``(los, his)``."""
    merged = []
    for lo, hi, _ in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return (np.array([m[0] for m in merged], dtype=np.uint64),
            np.array([m[1] for m in merged], dtype=np.uint64))


def _program(pid: int) -> str:
    return f"({pid & 0x1FFFFF}, {(pid >> 21) & 0x1FFFFF}, {pid >> 42})"


def _argument(addr: int) -> str:
    return next((repr(n) for lo, hi, n in _STATE.spans if lo <= addr < hi), "?")


def _check_races():
    """At the end of a launch: no byte stored by two programs, none stored by one program and
    loaded by another (:class:`DataRace`)."""
    if not _STATE.stores:
        return
    sa = np.concatenate([a for a, _ in _STATE.stores])
    sp = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p in _STATE.stores])
    order = np.argsort(sa, kind="stable")
    sa, sp = sa[order], sp[order]
    ww = np.flatnonzero((sa[1:] == sa[:-1]) & (sp[1:] != sp[:-1]))
    if ww.size:
        a = int(sa[ww[0]])
        raise DataRace(f"{_STATE.kernel}: byte {hex(a)} of argument {_argument(a)} is stored by "
                       f"programs {_program(int(sp[ww[0]]))} and {_program(int(sp[ww[0] + 1]))} "
                       f"of one launch (write-write race; {ww.size} such bytes)")
    if not _STATE.loads:
        return
    ua, first = np.unique(sa, return_index=True)  # each stored byte once, with its one program
    up = sp[first]
    la = np.concatenate([a for a, _, _ in _STATE.loads])
    lw = np.concatenate([np.full(a.size, w, dtype=np.uint64) for a, w, _ in _STATE.loads])
    lp = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, _, p in _STATE.loads])
    # the first stored byte at or after each loaded element's start: inside the element?
    i = np.minimum(np.searchsorted(ua, la), ua.size - 1)
    rw = np.flatnonzero((ua[i] >= la) & (ua[i] < la + lw) & (up[i] != lp))
    if rw.size:
        j = rw[0]
        a = int(la[j])
        raise DataRace(f"{_STATE.kernel}: byte {hex(a)} of argument {_argument(a)} is stored by "
                       f"program {_program(int(up[i[j]]))} and loaded by program "
                       f"{_program(int(lp[j]))} of one launch (read-write race; {rw.size} such "
                       f"loads)")


@functools.lru_cache(maxsize=None)
def install() -> str | None:
    """Wrap the interpreter's kernel launch and its loads / stores (once per process). Returns
    None, or why nothing was installed (a Triton without these hooks)."""
    from triton.runtime import interpreter as it
    GE, B = getattr(it, "GridExecutor", None), getattr(it, "InterpreterBuilder", None)
    hooks = ("create_masked_load", "create_masked_store", "create_load", "create_store")
    if GE is None or B is None or not all(hasattr(B, h) for h in hooks):
        return "triton.runtime.interpreter lacks GridExecutor / InterpreterBuilder's load and store"
    call = GE.__call__

    @functools.wraps(call)
    def launch(self, *args, **kwargs):
        keys = ("spans", "merged", "kernel", "loads", "stores")
        outer = tuple(getattr(_STATE, k, None) for k in keys)
        # (None: a GPU tensor, which the interpreter copies to host memory at addresses not
        # known here; such launches, TRITON_INTERPRET=1 on a GPU machine, are not checked)
        _STATE.spans = _spans(getattr(self, "arg_names", None), args, kwargs)
        _STATE.merged = None if _STATE.spans is None else _merge(_STATE.spans)
        _STATE.kernel = getattr(self.fn, "__name__", "kernel")
        _STATE.loads, _STATE.stores = [], []
        try:
            out = call(self, *args, **kwargs)
            _check_races()
            return out
        finally:
            for k, v in zip(keys, outer):
                setattr(_STATE, k, v)

    GE.__call__ = launch
    masked_load, masked_store = B.create_masked_load, B.create_masked_store

    def create_masked_load(self, ptrs, mask, other, *a, **kw):
        _check_access(self, ptrs, mask, "load")
        return masked_load(self, ptrs, mask, other, *a, **kw)

    def create_masked_store(self, ptrs, value, mask, *a, **kw):
        _check_access(self, ptrs, mask, "store")
        return masked_store(self, ptrs, value, mask, *a, **kw)

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    # (create_load / create_store build an all-true mask and call the two above)
    return None


@functools.lru_cache(maxsize=None)
def check() -> str | None:
    """None if the installed checker catches a load one element past a tensor (and lets the
    masked form and an in-bounds store through), else the reason it cannot be relied on."""
    why = install()
    if why:
        return why
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, n, LIMIT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n + LIMIT
        tl.store(Y + i, tl.load(X + i, mask=m), mask=i < n)

    x, y = torch.arange(8.0), torch.zeros(8)
    _copy[(1,)](x, y, 7, LIMIT=0, BLOCK=8)
    if not torch.equal(y[:7], x[:7]):
        return "the bounds checker's self-test: the in-bounds copy went wrong"
    try:
        _copy[(1,)](x[:7], y, 7, LIMIT=1, BLOCK=8)  # reads x[7], past the 7-element view
    except Exception as e:  # (the interpreter re-raises it as InterpreterError(repr(e)))
        if not (is_out_of_bounds(e) and "past the end of argument 'X'" in str(e)):
            raise
    else:
        return "the bounds checker's self-test: a load past the end of a tensor went unnoticed"

    @triton.jit
    def _shift(X, SHIFT: tl.constexpr):  # program p: x[p + SHIFT] = x[p] + 1
        p = tl.program_id(0)
        tl.store(X + p + SHIFT, tl.load(X + p) + 1.0)

    _shift[(4,)](torch.zeros(8), SHIFT=4)  # disjoint: no race
    for shift, kind in ((1, "read-write"), (0, None)):
        try:
            _shift[(4,)](torch.zeros(8), SHIFT=shift)
        except Exception as e:
            if not (is_data_race(e) and kind in str(e)):
                raise
        else:
            if kind:
                return f"the race checker's self-test: a {kind} race went unnoticed"

    @triton.jit
    def _all_to_one(X):
        tl.store(X, tl.program_id(0).to(tl.float32))

    try:
        _all_to_one[(3,)](torch.zeros(1))
    except Exception as e:
        if is_data_race(e) and "write-write" in str(e):
            return None
        raise
    return "the race checker's self-test: a write-write race went unnoticed"
