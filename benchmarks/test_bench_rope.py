"""Benchmarks of ``vidgen_kernels.apply_rope`` (3D RoPE on the video tokens of a text + video
sequence, CogVideoX style: text first, ``offset = text length``).

Run::

    python -m pytest benchmarks/test_bench_rope.py --benchmark-json /tmp/r.json   # full
    python -m pytest benchmarks/test_bench_rope.py --quick                        # smoke test
    python benchmarks/summarize.py /tmp/r.json                                    # tables

Cases: direction (fwd, fwd+bwd) x shape x device x contender; ``x`` is ``[B, S, H, D]``
contiguous, the tables come from ``rope3d_freqs`` (``[L, D/2]`` float32; ``[L, D]`` repeated for
the diffusers contender), interleaved pairs. Shapes ``(B, text, (T, Hh, W), H, D)``:

* CPU, fp32: ``(1, 16, (8, 16, 16), 4, 64)``: S = 16 + 2048; ``--quick``: ``(1, 16, (2, 8, 8), 4, 64)``.
* CUDA, bf16: CogVideoX-5B ``(1, 226, (13, 30, 45), 48, 64)``: S = 226 + 17,550;
  ``--quick``: ``(1, 226, (2, 30, 45), 48, 64)``.

Contenders (one pytest-benchmark group per direction, shape, dtype, device):

* every kernel backend of the device (``cpu``; ``cuda``, ``triton``) through ``apply_rope``;
* ``reference``: ``apply_rope(backend="reference")`` (eager PyTorch: slice, rotate in fp32, cat);
* ``diffusers``: CogVideoX's eager ``apply_rotary_emb`` on the video slice (``x * cos +
  rotate(x) * sin`` in fp32 on ``[L, D]`` tables), concatenated back behind the text tokens;
* ``torch.compile``: ``torch.compile(apply_rope_reference, dynamic=False)`` (compiled and warmed
  up per case outside the timed region; skipped under ``--quick``, compiling costs seconds);
* ``copy``: ``dst.copy_(src)`` moving the same byte count (the bandwidth limit).

Byte model (``bytes_moved``): ``A = B*S*H*D*s`` (``s`` bytes per element), ``Tb = L * D * 4``
(the two fp32 ``[L, D/2]`` tables): fwd ``2A + Tb`` (read x and the tables, write out), fwd+bwd
``4A + 2 Tb`` (+ read dout and the tables, write dx). Timing as ``test_bench_adaln.py``
(``benchmarks/common.py``): calibration, ``benchmark.pedantic`` with rounds sized for a target
time; CUDA with the synchronising timer and a CUDA-event cross-check; inputs rotated over enough
copies to exceed 2x the last-level cache. Each non-reference contender is checked against the
reference once before timing. Unavailable contenders are skipped with the reason.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

import common
from common import COMPILE, COPY, REFERENCE
from vidgen_kernels import BackendUnavailableError

OP = "apply_rope"
DIFFUSERS = "diffusers"
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
FULL_SHAPES = {"cpu": ((1, 16, (8, 16, 16), 4, 64),), "cuda": ((1, 226, (13, 30, 45), 48, 64),)}
QUICK_SHAPES = {"cpu": ((1, 16, (2, 8, 8), 4, 64),), "cuda": ((1, 226, (2, 30, 45), 48, 64),)}


def contenders(device_type: str) -> tuple[str, ...]:
    return (*KERNEL_BACKENDS[device_type], COMPILE, REFERENCE, DIFFUSERS, COPY)


@dataclass(frozen=True)
class Case:
    direction: str
    shape: tuple  # (B, text, (T, Hh, W), H, D)
    device: str
    dtype: torch.dtype
    contender: str

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(B, S, H, D, L) with L = T*Hh*W video tokens and S = text + L."""
        B, text, (T, Hh, W), H, D = self.shape
        L = T * Hh * W
        return B, text + L, H, D, L

    @property
    def text(self) -> int:
        return self.shape[1]

    def _key(self) -> str:
        B, text, (T, Hh, W), H, D = self.shape
        return f"B{B}xtext{text}xgrid{T}x{Hh}x{W}xH{H}xD{D}"

    @property
    def id(self) -> str:
        return f"{OP}-{self.direction}-{self._key()}-{common.dtype_name(self.dtype)}-{self.device}-{self.contender}"

    @property
    def group(self) -> str:
        return f"{OP} {self.direction} {self._key()} {common.dtype_name(self.dtype)} {self.device}"

    @property
    def backward(self) -> bool:
        return self.direction == "fwd+bwd"


def make_cases(quick: bool, devices) -> list[Case]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    return [Case(direction, shape, dev, common.DTYPES[dev], c)
            for dev in devices for shape in shapes[dev] for direction in common.DIRECTIONS
            for c in contenders(dev)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def bytes_moved(case: Case) -> tuple[int, str]:
    B, S, H, D, L = case.dims
    s = torch.empty((), dtype=case.dtype).element_size()
    A, Tb = B * S * H * D * s, L * D * 4
    if case.backward:
        return 4 * A + 2 * Tb, (f"4 x B*S*H*D*{s} + 2 x L*D*4 (fwd: read x, tables; write out | "
                                "bwd: read dout, tables; write dx)")
    return 2 * A + Tb, f"2 x B*S*H*D*{s} + L*D*4 (read x and the fp32 [L, D/2] cos/sin; write out)"


def set_bytes(case: Case) -> int:
    B, S, H, D, _ = case.dims
    return (2 if case.backward else 1) * B * S * H * D * torch.empty((), dtype=case.dtype).element_size()


# ----------------------------------------------------------------------------------------------
# inputs and contenders
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case, seed: int) -> dict:
    import vidgen_kernels as vk
    B, S, H, D, L = case.dims
    _, _, (T, Hh, W), _, _ = case.shape
    g = torch.Generator(device=case.device).manual_seed(777 + seed)
    kw = dict(device=case.device, dtype=case.dtype, generator=g)
    cos, sin = vk.rope3d_freqs(T, Hh, W, D, device=case.device)
    inp = {"x": torch.randn(B, S, H, D, **kw).requires_grad_(case.backward), "cos": cos, "sin": sin}
    if case.contender == DIFFUSERS:  # diffusers' [L, D] layout, made before timing
        inp["cos_full"] = cos.repeat_interleave(2, dim=-1)
        inp["sin_full"] = sin.repeat_interleave(2, dim=-1)
    if case.backward:
        inp["dout"] = torch.randn(B, S, H, D, **kw)
    return inp


def diffusers_rope(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor, text: int):
    """CogVideoX's eager path: ``apply_rotary_emb`` (interleaved, fp32) on ``x[:, text:]``."""
    xv = x[:, text:].float()
    c, s = cos_full[None, :, None, :], sin_full[None, :, None, :]
    xr, xi = xv.reshape(*xv.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-xi, xr], dim=-1).flatten(-2)
    return torch.cat([x[:, :text], (xv * c + rot * s).to(x.dtype)], dim=1)


def op_fn(case: Case, compiled=None):
    import vidgen_kernels as vk
    text = case.text
    if case.contender == COMPILE:
        return lambda i: compiled(i["x"], i["cos"], i["sin"], offset=text)
    if case.contender == DIFFUSERS:
        return lambda i: diffusers_rope(i["x"], i["cos_full"], i["sin_full"], text)
    backend = case.contender
    return lambda i: vk.apply_rope(i["x"], i["cos"], i["sin"], offset=text, backend=backend)


def step_fn(case: Case, f, inp: dict):
    if not case.backward:
        return lambda: f(inp)
    return lambda: torch.autograd.grad(f(inp), (inp["x"],), inp["dout"])


def copy_step(case: Case, seed: int):
    nbytes, _ = bytes_moved(case)
    s = torch.empty((), dtype=case.dtype).element_size()
    g = torch.Generator(device=case.device).manual_seed(99 + seed)
    src = torch.randn(nbytes // (2 * s), device=case.device, dtype=case.dtype, generator=g)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return lambda: dst.copy_(src)


def check_against_reference(case: Case, f, inp: dict) -> float:
    import vidgen_kernels as vk
    ref = lambda i: vk.apply_rope(i["x"], i["cos"], i["sin"], offset=case.text, backend=REFERENCE)  # noqa: E731
    got, want = [f(inp)], [ref(inp)]
    if case.backward:
        got += torch.autograd.grad(got[0], (inp["x"],), inp["dout"])
        want += torch.autograd.grad(want[0], (inp["x"],), inp["dout"])
    return common.assert_rel_err(case, got, want)


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in (REFERENCE, COMPILE, DIFFUSERS, COPY):
        return None
    return common.kernel_unavailable(case.contender, case.device, "rope_{backend}", "RoPE")


def _compile(case: Case, inp: dict):
    """torch.compile of the reference function, compiled and warmed up on ``inp``."""
    import vidgen_kernels as vk
    return common.compile_contender(vk.apply_rope_reference,
                                    lambda c: step_fn(case, op_fn(case, c), inp)(), case.device)


def test_rope(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")
    quick = request.config.getoption("--quick")
    if quick and case.contender == COMPILE:
        pytest.skip("--quick: torch.compile contender skipped (compiling takes seconds per case)")
    pol = common.policy(quick, case.device)
    nbytes, bytes_desc = bytes_moved(case)
    info = {}

    if case.contender == COPY:
        n_sets = common.rotation_sets(nbytes, case.device)
        steps = [copy_step(case, i) for i in range(n_sets)]
    else:
        n_sets = common.rotation_sets(set_bytes(case), case.device)
        sets = [make_inputs(case, i) for i in range(n_sets)]
        compiled = None
        if case.contender == COMPILE:
            compiled, info["compile_s"] = _compile(case, sets[0])
        f = op_fn(case, compiled)
        if case.contender != REFERENCE:
            try:
                info["max_rel_err_vs_reference"] = check_against_reference(case, f, sets[0])
            except (NotImplementedError, BackendUnavailableError) as e:
                pytest.skip(f"{case.contender} cannot run this case: {type(e).__name__}: {e}")
        steps = [step_fn(case, f, s) for s in sets]
    call = common.rotate(steps)

    call_s = common.estimate_call_s(call, case.device, pol.warmup_calls, pol.calibration_calls)
    rounds, iterations = common.plan(pol, case.device, call_s)
    if case.device == "cuda":
        benchmark._timer = common.cuda_sync_timer
    wait = request.config.getoption("--wait-quiet")
    if wait > 0:
        info["waited_for_quiet_s"] = round(common.wait_for_quiet(wait), 1)
    foreign = common.ForeignCpu()
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=pol.warmup_rounds)
    other_share = foreign.stop()

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    median_s = stats.stats.median if stats is not None else None
    B, S, H, D, L = case.dims
    info.update(
        op=OP,
        direction=case.direction,
        contender=case.contender,
        backend=(case.contender if case.contender not in (COMPILE, COPY, DIFFUSERS) else
                 f"{REFERENCE} (torch.compile)" if case.contender == COMPILE else None),
        dtype=common.dtype_name(case.dtype),
        shape=[B, S, H, D],
        grid=list(case.shape[2]),
        offset=case.text,
        rotated_positions=L,
        interleaved=True,
        device=case.device,
        device_name=common.device_name(case.device),
        bytes_moved=nbytes,
        bytes_counted=bytes_desc,
        median_ms=median_s * 1e3 if median_s else None,
        gbps=nbytes / median_s / 1e9 if median_s else None,
        rounds=rounds,
        iterations_per_round=iterations,
        input_sets=n_sets,
        timer="cuda_sync_timer (sync once per round)" if case.device == "cuda" else "perf_counter",
        torch_threads=torch.get_num_threads(),
        malloc_reuse=common.malloc_reuse_enabled() if case.device == "cpu" else None,
        other_processes_cpu_share=other_share,
        **common.versions(),
    )
    if case.device == "cuda" and median_s:
        ev_ms = common.cuda_event_per_call_ms(call, iterations, reps=max(5, min(rounds, 20)))
        info["median_ms_cuda_events"] = ev_ms
        info["gbps_cuda_events"] = nbytes / (ev_ms * 1e-3) / 1e9
    benchmark.extra_info.update(info)
    if other_share is not None and other_share > common.NOISY_SHARE:
        common.NOISY_CASES.append((case.id, other_share))

    del call, steps
    if case.contender == COMPILE:
        torch._dynamo.reset()
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
