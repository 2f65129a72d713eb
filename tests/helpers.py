"""Shared test helpers: backend/device/dtype grid, the flash-attention tolerance rule, and the
fused-vs-reference model check."""
from __future__ import annotations

import pytest
import torch

import vidgen_kernels as vk
from vidgen_kernels.backends import why_unavailable

HAS_CUDA = torch.cuda.is_available()

# (backend, device) pairs and the dtypes each is tested in. Triton on CPU runs in the
# interpreter (slow: small shapes only there), whose bf16 arithmetic is made GPU-faithful by
# interp_fixes (installed by conftest.py); its bf16 cases skip with the reason if that
# patch's self-check fails with the installed Triton.
GRID = [
    ("cpu", "cpu", (torch.float32, torch.float16, torch.bfloat16)),
    ("triton", "cpu", (torch.float32, torch.float16, torch.bfloat16)),
    ("cuda", "cuda", (torch.float32, torch.float16, torch.bfloat16)),
    ("triton", "cuda", (torch.float32, torch.float16, torch.bfloat16)),
]


def interp_fixes_skip():
    """None when Triton's interpreter runs bf16 kernels faithfully here (interp_fixes), else
    why."""
    import interp_fixes
    return interp_fixes.check()


def backend_params(dtypes_filter=None):
    """pytest params (backend, device, dtype) with a skip mark carrying the reason when the backend
    cannot run here."""
    out = []
    for backend, device, dtypes in GRID:
        if device == "cuda" and not HAS_CUDA:
            why = "no CUDA GPU visible"
        else:
            why = why_unavailable(backend, device)
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {why}")] if why else []
        interp = backend == "triton" and device == "cpu" and not why
        if backend == "triton":
            marks.append(pytest.mark.triton)
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        for dt in dtypes:
            if dtypes_filter is not None and dt not in dtypes_filter:
                continue
            m = marks
            why_bf16 = interp_fixes_skip() if interp and dt == torch.bfloat16 else None
            if why_bf16:
                m = marks + [pytest.mark.skip(reason=f"triton bf16 in the interpreter: {why_bf16}")]
            out.append(pytest.param(backend, device, dt, marks=m,
                                    id=f"{backend}-{device}-{str(dt).replace('torch.', '')}"))
    return out


def scaled_tables(ang):
    """RoPE tables ``(cos, sin)`` of angles ``ang [L, D/2]`` times a per-position scale from 0.5
    to 1.5: not a pure rotation (``cos^2 + sin^2 != 1``), as learned tables become after an
    optimizer step or xPos-style tables are. (Table gradients were exact only for unit tables:
    off by ``cos^2 + sin^2``.)"""
    sc = torch.linspace(0.5, 1.5, ang.shape[0], dtype=ang.dtype, device=ang.device)[:, None]
    return ang.cos() * sc, ang.sin() * sc


def _rule_errors(got, ref_hi, ref_lo, name) -> tuple[float, float, float]:
    """``(max |got - hi|, max |lo - hi|, max(1, max |hi|))`` after checking shape, dtype and
    finiteness (0, 0, 1 for empty tensors)."""
    assert got.shape == ref_hi.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref_hi.shape)}"
    assert got.dtype == ref_lo.dtype, f"{name}: dtype {got.dtype} vs {ref_lo.dtype}"
    g, h, lo = got.double(), ref_hi.double(), ref_lo.double()
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    if not h.numel():
        return 0.0, 0.0, 1.0
    return ((g - h).abs().max().item(), (lo - h).abs().max().item(),
            max(1.0, h.abs().max().item()))


def assert_close_rule(got, ref_hi, ref_lo, name, floor=1e-5, factor=2.0):
    """flash-attention's rule: |got - ref_hi| <= factor * |ref_lo - ref_hi| + floor * scale
    (``factor`` 2 unless a test says why its paths round in different places).

    ``ref_hi``: the reference in float64; ``ref_lo``: the reference run in the tested dtype.
    """
    err, ref_err, scale = _rule_errors(got, ref_hi, ref_lo, name)
    bound = factor * ref_err + floor * scale
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


def assert_grads_close_rule(got, ref_lo, ref_hi, factor=2.0):
    """:func:`assert_close_rule` on every gradient of three runs of one model, each a list of
    ``(name, grad or None)`` in the same order: a gradient must exist exactly where the float64
    reference has one."""
    for (n, a), (_, b), (_, c) in zip(got, ref_lo, ref_hi):
        assert (a is None) == (c is None), f"{n}: gradient presence differs from the reference"
        if a is not None:
            assert_close_rule(a, c, b, f"grad {n}", factor=factor)


def assert_close_rule_over_cases(got, ref_hi, ref_lo, name, floor=1e-5, factor=2.0):
    """flash-attention's rule on the mean over several seeded cases (lists of tensors, one per
    case): ``mean_c max|got_c - hi_c| <= factor * mean_c max|lo_c - hi_c| + floor * scale``.
    The max error of one small tensor (a bias gradient summed over a few dozen tokens) is a
    noisy statistic: its ratio to the reference's own drifts between about 1x and 2.3x from seed
    to seed for the same kernels; the mean over cases is the steadier one."""
    errs, ref_errs, scale = [], [], 1.0
    for i, (g, h, lo) in enumerate(zip(got, ref_hi, ref_lo)):
        e, r, sc = _rule_errors(g, h, lo, f"{name} case {i}")
        if h.numel():
            errs.append(e)
            ref_errs.append(r)
            scale = max(scale, sc)
    err = sum(errs) / max(len(errs), 1)
    ref_err = sum(ref_errs) / max(len(ref_errs), 1)
    bound = factor * ref_err + floor * scale
    assert err <= bound, (f"{name}: mean max error {err:.3g} > bound {bound:.3g} (reference's "
                          f"own {ref_err:.3g}; per case {[f'{e:.3g}' for e in errs]} vs "
                          f"{[f'{e:.3g}' for e in ref_errs]})")


def perturb(model, std: float = 0.05, seed: int = 1):
    """Add seeded N(0, std) noise to every parameter in place, so zero-initialised paths (AdaLN-Zero
    gates, final layers, zero-init convs) contribute; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # drawn on the CPU (the same noise on every device), added on the parameter's device
            p.add_(std * torch.randn(p.shape, generator=g, device="cpu").to(p.device))
    return model


# marks of a test case that needs a GPU (``pytest -m cuda`` picks it; skipped with the reason
# otherwise), and the devices a model test runs on: CPU always, CUDA when a GPU is visible
CUDA_MARKS = [pytest.mark.cuda] + (
    [] if HAS_CUDA else [pytest.mark.skip(reason="no CUDA GPU visible")])
MODEL_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]


def assert_fused_matches_reference(model, x, t, text, *, aux: bool = False,
                                   every_param_grad: bool = False, device: str = "cpu"):
    """``model`` (fp32, default backends) against a deep copy of it with ``backend="reference"``,
    both moved to ``device`` with the inputs: the output, the input gradient and every parameter
    gradient of ``sum(w * model(x, t, text))`` (plus ``0.1 * aux_loss``, whose values must agree
    too, when ``aux``). A parameter without a gradient in the fused model must have none (or an
    all-zero one) in the reference, unless ``every_param_grad`` (then every parameter must get
    one in both). On CUDA the fused model runs the GPU backends (``cuda``, ``triton``); fp32
    dots there are IEEE (no TF32), so the CPU tolerances apply."""
    import copy
    model = model.to(device)
    x, t, text = x.to(device), t.to(device), text.to(device)
    ref = copy.deepcopy(model)
    ref.backend = "reference"
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = model(x1, t, text), ref(x2, t, text)
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(y1)
    loss1, loss2 = (y1 * w).sum(), (y2 * w).sum()
    if aux:
        torch.testing.assert_close(model.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)
        loss1, loss2 = loss1 + 0.1 * model.aux_loss, loss2 + 0.1 * ref.aux_loss
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    for (n, p1), p2 in zip(model.named_parameters(), ref.parameters()):
        if every_param_grad:
            assert p1.grad is not None and p2.grad is not None, n
        elif p1.grad is None:
            assert p2.grad is None or p2.grad.abs().max() == 0, n
            continue
        torch.testing.assert_close(p1.grad, p2.grad, atol=2e-4, rtol=1e-3,
                                   msg=lambda m, n=n: f"{n}: {m}")


def assert_autocast_casts_qkv(op, q, k, v, **kw):
    """``op(q, k, v, **kw)`` with fp32 q / k and a bf16 v: a TypeError outside autocast; under
    bf16 ``torch.autocast`` exactly the call on bf16 operands (output and gradients, the fp32
    leaves getting fp32 gradients), as autocast treats SDPA."""
    g = torch.Generator().manual_seed(7)
    with pytest.raises(TypeError, match="v has dtype torch.bfloat16 but q has torch.float32"):
        op(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v, **kw)
    assert out.dtype == torch.bfloat16
    qb, kb = (t.detach().bfloat16().requires_grad_() for t in (q, k))
    vb = v.detach().clone().requires_grad_()
    want = op(qb, kb, vb, **kw)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    cot = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(cot)
    want.backward(cot)
    for a, b in ((q, qb), (k, kb), (v, vb)):
        assert a.grad.dtype == a.dtype
        torch.testing.assert_close(a.grad, b.grad.to(a.dtype), rtol=0, atol=0)
    # float64 operands are left alone, as autocast leaves them (they used to be cast to bf16),
    # where the backend takes float64 at all
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    try:
        want = op(q64, k64, v64, **kw)
    except vk.BackendUnavailableError:
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q64, k64, v64, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def jvp_backend_params(*extra: str):
    """pytest params of the backends a forward-mode-AD test runs on CPU tensors: ``cpu``,
    ``auto``, then ``extra`` (test-specific names), then ``triton`` in the interpreter (skip mark
    with the reason when it cannot run here)."""
    out = [pytest.param(n, id=n) for n in ("cpu", "auto", *extra)]
    why = why_unavailable("triton", "cpu")
    out.append(pytest.param("triton", id="triton-interpreter", marks=[pytest.mark.triton] + (
        [pytest.mark.skip(reason=f"triton on cpu: {why}")] if why else [])))
    return out


def forbid(monkeypatch, module, name: str, what: str):
    """From here on ``module.name`` raises: a path that falls back to ``what`` fails."""
    def boom(*a, **k):
        raise AssertionError(f"{what} ran")
    monkeypatch.setattr(module, name, boom)


BIAS_LAYOUTS = ("transposed", "sliced", "expand-cols", "expand-rows")


def bias_layout(t, layout: str):
    """``t [E, M]`` stored another way: ``transposed`` (strides (1, E), same values),
    ``sliced`` (every other column of a ``[E, 2M]`` tensor, strides (2M, 2), same values),
    ``expand-cols`` / ``expand-rows`` (t's first column / row broadcast, stride 0)."""
    E, M = t.shape
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        wide = torch.zeros(E, 2 * M, dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "expand-cols":
        return t[:, :1].expand(E, M)
    if layout == "expand-rows":
        return t[:1].expand(E, M)
    raise ValueError(f"bias_layout: unknown layout {layout!r}")


def meta_init(module_fn):
    """The large-model init workflow (FSDP2 / torchtitan): ``module_fn("meta")``, ``to_empty``
    on the CPU, then ``reset_parameters()`` on every module that has one, parents first
    (``modules()`` order). ``to_empty`` leaves garbage: it is filled with NaN first, so that a
    parameter nobody resets shows."""
    m = module_fn("meta").to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    for sub in m.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return m


def fake_gpus(monkeypatch, gpus):
    """Pretend (on CPU) that the visible GPUs are ``gpus``: (name, (major, minor), opt-in shared
    memory bytes per block) each, with the backend module's per-device caches emptied."""
    import types

    from vidgen_kernels import backends
    monkeypatch.setattr(backends, "_TRITON_ARCH_ERRORS", {})
    monkeypatch.setattr(backends, "_SHARED_MEMORY", {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: gpus[i][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: types.SimpleNamespace(
        shared_memory_per_block=49152, shared_memory_per_block_optin=gpus[i][2]))


def assert_no_host_sync(step):
    """Run ``step()`` once (warm-up: JIT, autotuning, once-per-device checks), then again under
    ``torch.cuda.set_sync_debug_mode("error")``: a host-device synchronisation in it raises."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
