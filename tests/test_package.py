"""The package imports and works without its compiled extension, and reports what it has."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import vidgen_kernels as vk
from helpers import fake_gpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_EXT = r"""
import importlib.abc, importlib.machinery, sys
class Broken(importlib.abc.Loader):  # behaves like an extension built against another torch
    def create_module(self, spec):
        raise ImportError("undefined symbol (simulated)")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "vidgen_kernels._C":
            return importlib.machinery.ModuleSpec(name, Broken())
sys.meta_path.insert(0, Block())
import torch, vidgen_kernels as vk
assert vk._ext.C is None, vk._ext.C
assert "cpu" not in vk.available_backends("cpu") and "reference" in vk.available_backends("cpu")
x, s = torch.randn(2, 4, 8), torch.randn(2, 8)
out = vk.adaln_modulate(x, s, s)  # auto -> reference
torch.testing.assert_close(out, vk.adaln_modulate_reference(x, s, s))
try:
    vk.adaln_modulate(x, s, s, backend="cpu")
except vk.BackendUnavailableError as e:
    assert "not built" in str(e) or "failed to load" in str(e), e
else:
    raise AssertionError("backend='cpu' without the extension must raise")
print(vk.extension_status())
"""


def test_import_without_extension():
    r = subprocess.run([sys.executable, "-c", _NO_EXT], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "not built" in r.stdout or "failed to load" in r.stdout


_LACKING_CPU = r"""
import builtins, sys
real_open = builtins.open
def fake_open(file, *a, **k):  # a CPU whose flags lack avx2 (and everything after it)
    if file == "/proc/cpuinfo":
        file = sys.argv[1]
    return real_open(file, *a, **k)
builtins.open = fake_open
import torch, vidgen_kernels as vk
builtins.open = real_open
assert vk._ext.C is None and "vidgen_kernels._C" not in sys.modules, "must not even load it"
assert "cpu" not in vk.available_backends("cpu")
x, s = torch.randn(2, 4, 8), torch.randn(2, 8)
torch.testing.assert_close(vk.adaln_modulate(x, s, s), vk.adaln_modulate_reference(x, s, s))
try:
    vk.adaln_modulate(x, s, s, backend="cpu")
except vk.BackendUnavailableError as e:
    print(e)
else:
    raise AssertionError("backend='cpu' must raise")
"""


def test_extension_compiled_for_missing_cpu_features_is_not_loaded(tmp_path):
    """An extension built with -march=native elsewhere is left unloaded, with the reason, on a
    CPU that lacks a feature the build recorded (loading it could already SIGILL)."""
    from vidgen_kernels._ext import missing_cpu_features
    record, cpuinfo = tmp_path / "record", tmp_path / "cpuinfo"
    record.write_text("# comment avx512f\nsse4_2 avx2 avx512f\n")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2\n\nprocessor\t: 1\n")
    assert missing_cpu_features(str(record), str(cpuinfo)) == ["avx512f"]
    cpuinfo.write_text("flags\t: sse4_2 avx2 avx512f avx512bw\n")
    assert missing_cpu_features(str(record), str(cpuinfo)) == []
    assert missing_cpu_features(str(tmp_path / "none"), str(cpuinfo)) == []  # older build
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # no x86 flags line
    assert missing_cpu_features(str(record), str(cpuinfo)) == []
    if vk._ext.C is None:
        return
    # the build recorded what it compiled for, and this CPU has it all (else C would be None)
    here = os.path.join(os.path.dirname(vk._ext.C.__file__), "_C.cpu_features")
    assert os.path.exists(here), "the build must write _C.cpu_features beside the library"
    assert missing_cpu_features(here) == []
    need = [w for line in open(here) if not line.startswith("#") for w in line.split()]
    cpuinfo.write_text("flags\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt\n")
    if set(need) - {"pni", "ssse3", "sse4_1", "sse4_2", "popcnt"}:  # built beyond that CPU
        r = subprocess.run([sys.executable, "-c", _LACKING_CPU, str(cpuinfo)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "compiled for CPU features this CPU lacks" in r.stdout, r.stdout
        assert "VIDGEN_KERNELS_CPU_FLAGS" in r.stdout, r.stdout
        # the escape hatch (a kernel that does not name a feature the CPU has): loads it
        skip = _LACKING_CPU.split("builtins.open = real_open")[0] + \
            "builtins.open = real_open\nassert vk._ext.C is not None\nprint('loaded')\n"
        r = subprocess.run([sys.executable, "-c", skip, str(cpuinfo)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120,
                           env=dict(os.environ, VIDGEN_KERNELS_SKIP_CPU_CHECK="1"))
        assert r.returncode == 0 and "loaded" in r.stdout, r.stderr


_IMPORT_ONLY = r"""
import sys
import vidgen_kernels, vidgen, vidgen_kernels.nn, vidgen_kernels.integrations.diffusers
heavy = sorted(m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules)
assert not heavy, heavy
"""


def test_import_loads_neither_dynamo_nor_triton():
    """``import vidgen_kernels`` (and vidgen) costs what importing torch costs: torch._dynamo
    alone adds ~1 s (torch.compiler.disable / assume_constant_result at module level import it),
    Triton ~0.2 s; both are imported where they are first used."""
    r = subprocess.run([sys.executable, "-c", _IMPORT_ONLY], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_constant_marking_is_torchs():
    """backends marks its device facts constant for dynamo without importing dynamo: the mark
    must stay the one torch.compiler.assume_constant_result sets (a torch that changes it fails
    here, not silently in compiled graphs)."""
    from vidgen_kernels import backends

    def ours():
        return None

    def torchs():
        return None
    assert backends._assume_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) != {}
    assert backends._cuda_image_error_at._dynamo_marked_constant


def test_cli_lists_backends():
    r = subprocess.run([sys.executable, "-m", "vidgen_kernels"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for b in vk.BACKENDS:
        assert b in r.stdout
    assert vk.extension_status() in r.stdout


def test_backend_checks_make_no_import_lookups(monkeypatch):
    """The backend checks run inside torch.compile'd code (every fused op resolves its backend);
    torch 2.11's dynamo cannot trace importlib.util.find_spec (each fullgraph compile of a
    fused op failed there), so the checks must not call it: triton's presence is looked up at
    import."""
    import importlib.util

    from vidgen_kernels import backends

    def no_lookup(*a, **k):
        raise AssertionError("importlib.util.find_spec called by a backend check")
    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    for name in backends.BACKENDS:
        for device in ("cpu", "cuda", None):
            backends.why_unavailable(name, device)
    vk.available_backends("cpu")


def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device, not on the device of the pointers it gets:
    an op on ``cuda:1`` tensors while ``cuda:0`` is current would run on the wrong GPU. Every
    launcher must enter ``_launch.device_ctx`` of its tensors around the launch. Checked here on
    the interpreter: each module's ``device_ctx`` is replaced by one that records the tensor it
    was given, and each kernel launch records whether it happened inside one, on the device of
    its first tensor argument."""
    import contextlib

    import pytest
    import torch
    if not vk.backends.triton_interpret():
        pytest.skip("checks the launchers on the Triton interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    import importlib

    active, launches = [], []

    @contextlib.contextmanager
    def recording_ctx(t):
        active.append(t.device)
        try:
            yield
        finally:
            active.pop()

    for m in ("adaln", "rope", "rope3d_attention", "temporal_attention", "moe"):
        mod = importlib.import_module(f"vidgen_kernels.triton_kernels.{m}")
        monkeypatch.setattr(mod, "device_ctx", recording_ctx, raising=False)
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        launches.append((self.fn.__name__, bool(active) and active[-1] == dev))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, y, gate, shift, scale = rnd(2, 5, 32), rnd(2, 5, 32), rnd(2, 32), rnd(2, 32), rnd(2, 32)
    out = vk.adaln_modulate(x, shift, scale, backend="triton")
    h, out2 = vk.gated_residual_adaln(x, y, gate, shift, scale, backend="triton")
    losses = [out.sum(), out2.sum() + h.sum()]
    q, k, v = rnd(1, 12, 2, 16), rnd(1, 12, 2, 16), rnd(1, 12, 2, 16)
    cos, sin = vk.rope3d_freqs(2, 2, 2, 16)
    losses.append(vk.apply_rope(q, cos, sin, offset=4, backend="triton").sum())
    losses.append(vk.rope3d_attention(q, k, v, cos, sin, rope_offset=4, backend="triton").sum())
    qt, kt, vt = rnd(1, 3, 2, 2, 16), rnd(1, 3, 2, 2, 16), rnd(1, 3, 2, 2, 16)
    losses.append(vk.temporal_attention(qt, kt, vt, backend="triton").sum())
    xm, logits, w1, w2 = rnd(6, 16), rnd(6, 3), rnd(3, 16, 8), rnd(3, 8, 16)
    losses.append(vk.moe_ffn(xm, logits, w1, w2, top_k=2, backend="triton").out.sum())
    sum(losses).backward()

    names = {name for name, _ in launches}
    outside = sorted({name for name, inside in launches if not inside})
    assert len(names) >= 6, names  # the check saw the kernels of every family
    assert not outside, f"Triton kernels launched outside their tensors' device context: {outside}"


def test_auto_falls_back_beyond_a_kernel_limit(monkeypatch):
    """``backend="auto"`` (and no backend) runs the reference when the kernel ``auto`` picks
    cannot take the size (head_dim, T_k, C beyond its limit), as the README says; only a
    backend named in the call raises. Before, the string ``"auto"`` raised like a named one.
    Emulates a GPU machine's order (``auto`` -> Triton) on CPU tensors in the interpreter."""
    import pytest
    import torch
    from vidgen_kernels import backends
    from vidgen_kernels.ops import adaln, rope3d_attention, temporal_attention

    if backends.why_unavailable("triton", "cpu"):
        pytest.skip(backends.why_unavailable("triton", "cpu"))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "reference"))
    D = rope3d_attention.MAX_D["triton"] + 2
    assert D == temporal_attention.MAX_D["triton"] + 2
    qr, qt = torch.randn(1, 3, 1, D), torch.randn(1, 2, 1, 1, D)
    C = adaln.MAX_C["triton"] + 1
    x, s = torch.randn(1, 2, C), torch.randn(1, C)
    calls = [
        (lambda b: vk.rope3d_attention(qr, qr, qr, backend=b),
         vk.rope3d_attention_reference(qr, qr, qr), "head_dim"),
        (lambda b: vk.temporal_attention(qt, qt, qt, backend=b),
         vk.temporal_attention_reference(qt, qt, qt), "head_dim"),
        (lambda b: vk.adaln_modulate(x, s, s, backend=b), vk.adaln_modulate_reference(x, s, s),
         "C <="),
    ]
    for f, want, what in calls:
        for b in ("auto", None):
            torch.testing.assert_close(f(b), want)
        with pytest.raises(ValueError, match=f"backend 'triton' supports {what}"):
            f("triton")


def test_module_level_imports_are_declared_dependencies():
    """Every third-party package that vidgen / vidgen_kernels import at module level is a declared
    dependency in pyproject.toml (triton: the optional extra of the triton_kernels subpackage);
    the installed ``vidgen`` command imported numpy, which was not declared."""
    import ast
    import pathlib
    import re
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    declared = {re.split(r"[<>=!~ \[]", d.strip().strip('"'))[0] for d in deps.split(",") if d.strip()}
    extras = {"triton": "vidgen_kernels/triton_kernels/"}
    for pkg in ("vidgen", "vidgen_kernels"):
        for path in pathlib.Path(ROOT, pkg).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:  # module level only (not lazy imports)
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("vidgen", "vidgen_kernels"):
                        continue
                    rel = path.relative_to(ROOT).as_posix()
                    assert top in declared or rel.startswith(extras.get(top, "-")), (rel, top, declared)


def test_cuda_backend_unavailable_without_a_kernel_image(monkeypatch):
    """A build for sm_80 / sm_90 (+PTX) has no code a V100 / T4 (sm_70 / sm_75) can load: the
    ``cuda`` backend says so (``auto`` then takes the next backend) instead of every launch failing with
    cudaErrorNoKernelImageForDevice. The query runs once per device. Emulated: a fake extension
    and a fake GPU, on CPU."""
    import torch
    from vidgen_kernels import _ext, backends

    calls = []

    class FakeC:
        with_cuda = True

        @staticmethod
        def cuda_kernel_image_error(index):
            calls.append(index)
            return "" if index == 1 else ("cudaErrorNoKernelImageForDevice: no kernel image is "
                                          "available for execution on the device")

    monkeypatch.setattr(_ext, "C", FakeC)
    monkeypatch.setattr(backends, "_CUDA_IMAGE_ERRORS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    why = backends.why_unavailable("cuda", "cuda:0")
    assert why is not None and "Tesla T4 (cuda:0, sm_75)" in why and "NoKernelImage" in why \
        and "TORCH_CUDA_ARCH_LIST including 7.5" in why, why
    assert "cuda" not in backends.available_backends("cuda:0")
    assert backends.why_unavailable("cuda", "cuda:1") is None
    backends.why_unavailable("cuda", "cuda:0")
    assert calls == [0, 1]  # cached per device
    # no index ("cuda"): every visible GPU must run the kernels, whichever is current (the answer
    # is folded into compiled graphs without a guard on the current device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    why = backends.why_unavailable("cuda", "cuda")
    assert why is not None and "cuda:0" in why, why
    assert calls == [0, 1]


def test_cuda_image_check_runs_when_the_first_call_is_compiled(monkeypatch):
    """A model whose first call is ``torch.compile``d (fullgraph) must still learn that this
    build's CUDA kernels cannot run on the GPU: the check is folded into the graph as a constant
    (it used to read an empty cache while tracing and answer "available")."""
    import torch
    from vidgen_kernels import _ext, backends

    class FakeC:
        with_cuda = True

        @staticmethod
        def cuda_kernel_image_error(index):
            return "cudaErrorNoKernelImageForDevice"

    monkeypatch.setattr(_ext, "C", FakeC)
    monkeypatch.setattr(backends, "_CUDA_IMAGE_ERRORS", {})
    # torch.cuda.is_available stays False: dynamo consults it itself (CUDA RNG state)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla V100")
    torch._dynamo.reset()

    def pick(x):
        return x + (1.0 if backends._cuda_image_error(torch.device("cuda", 0)) is None else 2.0)

    out = torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert backends._CUDA_IMAGE_ERRORS[0] is not None
    torch._dynamo.reset()


def test_triton_needs_compute_capability_8(monkeypatch):
    """Triton supports compute capability 8.0+ (it compiles tl.dot without tensor cores on a T4 /
    V100, and its attention tiles need more shared memory than these have: sm_75 builds of the
    RoPE-3D attention need 72-96 KiB, a T4 has 64): the ``triton`` backend is unavailable there,
    with the reason, and ``auto`` takes the next backend. Emulated GPUs, on CPU."""
    import torch
    from vidgen_kernels import backends
    if not backends.HAS_TRITON:
        pytest.skip("triton is not installed")
    fake_gpus(monkeypatch, [("Tesla T4", (7, 5), 65536),
                                       ("NVIDIA GeForce RTX 4090", (8, 9), 101376)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = backends.why_unavailable("triton", "cuda:0")
    assert why is not None and "compute capability >= 8.0" in why and "Tesla T4 (cuda:0)" in why \
        and "sm_75" in why, why
    assert backends.why_unavailable("triton", "cuda:1") is None
    assert backends.why_unavailable("triton", "cuda") == why  # no index: every visible GPU
    assert "triton" not in backends.available_backends("cuda:0")
    supported = {"triton": (torch.float32,)}
    assert backends.resolve(None, torch.device("cuda", 0), torch.float32, supported, "op") == "reference"
    assert backends.resolve(None, torch.device("cuda", 1), torch.float32, supported, "op") == "triton"
    with pytest.raises(backends.BackendUnavailableError, match=r"op: backend 'triton' cannot run "
                                                               r"here: Triton supports compute"):
        backends.resolve("triton", torch.device("cuda", 0), torch.float32, supported, "op")


def test_moe_cuda_backend_needs_triton_too(monkeypatch):
    """The MoE's ``cuda`` backend runs CUDA C++ routing and Triton's grouped GEMMs: on a GPU
    where the CUDA kernels load but Triton cannot run (a T4 with an extension built for sm_75),
    ``auto`` skips it (the other ops' ``cuda`` backend stays), an explicit ``backend="cuda"``
    names the Triton reason, and ``resolved_backends`` agrees. Emulated GPU, on CPU."""
    import torch
    import vidgen_kernels as vk
    from vidgen_kernels import backends
    from vidgen_kernels.ops import moe
    if not backends.HAS_TRITON:
        pytest.skip("triton is not installed")
    fake_gpus(monkeypatch, [("Tesla T4", (7, 5), 65536)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = backends.why_unavailable
    monkeypatch.setattr(backends, "why_unavailable",  # the CUDA kernels load on this T4
                        lambda name, device=None: None if name == "cuda" else real(name, device))
    dev = torch.device("cuda", 0)
    assert backends.resolve(None, dev, torch.float16, moe.SUPPORTED_DTYPES, "moe") == "cuda"  # (no needs)
    assert backends.resolve(None, dev, torch.float16, moe.SUPPORTED_DTYPES, "moe",
                            needs=moe.BACKEND_NEEDS) == "reference"
    with pytest.raises(backends.BackendUnavailableError,
                       match=r"moe: backend 'cuda' cannot run here: its triton kernels cannot run: "
                             r"Triton supports compute capability >= 8.0"):
        backends.resolve("cuda", dev, torch.float16, moe.SUPPORTED_DTYPES, "moe", needs=moe.BACKEND_NEEDS)
    got = vk.resolved_backends(dev, torch.float16)
    assert got["MoE"] == "reference" and got["AdaLN"] == "cuda" and got["RoPE"] == "cuda", got


def test_device_facts_are_constants_in_compiled_code(monkeypatch):
    """The GPU facts the backend choice and the tile limits read (Triton's capability check, the
    shared memory per block) are folded into compiled graphs as constants, per device index, the
    least over the visible GPUs without one, each queried once per device."""
    import torch
    from vidgen_kernels import backends
    fake_gpus(monkeypatch, [("NVIDIA H100", (9, 0), 232448),
                                       ("NVIDIA GeForce RTX 3090", (8, 6), 101376)])
    assert backends.shared_memory_per_block(torch.device("cuda", 0)) == 232448
    assert backends.shared_memory_per_block(torch.device("cuda", 1)) == 101376
    assert backends.shared_memory_per_block(torch.device("cuda")) == 101376
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: 1 / 0)
    assert backends.shared_memory_per_block(torch.device("cuda", 0)) == 232448  # cached
    monkeypatch.setattr(backends, "_SHARED_MEMORY", {})
    fake_gpus(monkeypatch, [("Tesla V100", (7, 0), 98304)])
    torch._dynamo.reset()

    def pick(x):
        dev = torch.device("cuda", 0)
        return x + backends.shared_memory_per_block(dev) + (
            1.0 if backends._triton_arch_error(dev) is None else 2.0)
    out = torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(out, torch.full((3,), 98306.0))
    assert backends._SHARED_MEMORY == {0: 98304} and backends._TRITON_ARCH_ERRORS[0] is not None
    torch._dynamo.reset()


def test_main_lists_each_gpu(monkeypatch, capsys):
    """``python -m vidgen_kernels`` prints every visible GPU with its architecture and shared
    memory per block, and each backend's availability there (Triton: not on sm_75). Emulated
    GPUs, on CPU."""
    import runpy

    import torch
    from vidgen_kernels import backends
    fake_gpus(monkeypatch, [("NVIDIA GeForce RTX 4090", (8, 9), 101376),
                                       ("Tesla T4", (7, 5), 65536)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_CUDA_IMAGE_ERRORS", {0: None, 1: None})
    runpy.run_module("vidgen_kernels.__main__", run_name="__main__")
    out = capsys.readouterr().out
    assert "cuda:0: NVIDIA GeForce RTX 4090, sm_89, 99 KiB shared memory per block" in out, out
    assert "cuda:1: Tesla T4, sm_75, 64 KiB shared memory per block" in out, out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith("  ")}
    assert lines[("cpu", "reference")].endswith("yes")
    if backends.HAS_TRITON:
        assert lines[("cuda:0", "triton")].endswith("yes"), out
        assert "no: Triton supports compute capability >= 8.0" in lines[("cuda:1", "triton")], out


def _setup_helpers():
    """setup.py's flag probes (``_compiles``, ``_cpu_flags``, ``_openmp_flags``,
    ``_cpu_features`` and their programs and tables), taken out of its source: importing setup.py would run ``setup()``."""
    import ast
    path = os.path.join(ROOT, "setup.py")
    if not os.path.isfile(path):
        pytest.skip("not a source tree")
    with open(path) as f:
        tree = ast.parse(f.read())
    names = {"_compiles", "_cpu_flags", "_openmp_flags", "_cpu_features", "_OPENMP_PROBE",
             "_PLAIN_PROBE", "_ISA_MACROS"}
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    assert len(keep) == len(names), "setup.py's probes were renamed: update this test"
    ns = {"os": os, "sys": sys}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    return ns


def _fake_compiler(tmp_path, name, body):
    """A shell script standing in for a C++ compiler: ``body`` handles one argument ``$a``
    (appending to ``args`` or exiting), then g++ runs with the rest."""
    p = tmp_path / name
    p.write_text("#!/usr/bin/env bash\nargs=(); prev=''\nfor a in \"$@\"; do\n" + body +
                 "\n  prev=\"$a\"\ndone\nexec g++ \"${args[@]}\"\n")
    p.chmod(0o755)
    return [str(p)]


_APPLE_CLANG = """  case "$a" in
    -march=native) echo "clang: error: unsupported argument 'native' to option '-march='" >&2; exit 1 ;;
    -mcpu=native) args+=(-march=native) ;;
    -fopenmp) [ "$prev" = -Xpreprocessor ] || { echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; }
              args+=(-fopenmp) ;;
    -Xpreprocessor) ;;
    -lomp) args+=(-lgomp) ;;
    *) args+=("$a") ;;
  esac"""
_NO_OPENMP = """  case "$a" in -fopenmp|-Xpreprocessor|-lomp) echo "error: no OpenMP" >&2; exit 1 ;; esac
  args+=("$a")"""


@pytest.mark.skipif(sys.platform != "linux" or not __import__("shutil").which("g++"),
                    reason="the fake compilers wrap g++ on Linux")
def test_build_flags_follow_what_the_compiler_takes(tmp_path, monkeypatch, capsys):
    """setup.py asks the compiler before it passes a flag: GCC gets -march=native and -fopenmp
    (the flags the build always had); a compiler like Apple's clang, which rejects both,
    gets -mcpu=native and, on macOS, -Xpreprocessor -fopenmp with torch's own omp.h / libomp
    (before, the build failed at its first file); one without OpenMP builds without it, with a
    warning (the kernels then run on one thread; the package reports it)."""
    h = _setup_helpers()
    monkeypatch.delenv("VIDGEN_KERNELS_CPU_FLAGS", raising=False)
    torch_dir = "/opt/torch"
    assert h["_cpu_flags"](["g++"]) == ["-march=native"]
    assert h["_openmp_flags"](["g++"], torch_dir, "linux") == (["-fopenmp"], ["-fopenmp"])
    assert not h["_compiles"](["g++"], ["-fno-such-flag-here"])
    # the import-time check's record: a baseline build needs nothing beyond x86-64 ([], no
    # warning); None only where the compiler cannot say
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert h["_cpu_features"](["g++"], ["-march=x86-64"]) == []
        assert {"avx", "avx2", "fma", "f16c"} <= set(h["_cpu_features"](["g++"], ["-march=haswell"]))
    assert h["_cpu_features"](["g++"], ["-fno-such-flag-here"]) is None

    apple = _fake_compiler(tmp_path, "clang++", _APPLE_CLANG)
    assert h["_cpu_flags"](apple) == ["-mcpu=native"]
    assert h["_openmp_flags"](apple, torch_dir, "darwin") == (
        ["-Xpreprocessor", "-fopenmp", "-I/opt/torch/include"],
        ["-L/opt/torch/lib", "-lomp", "-Wl,-rpath,/opt/torch/lib",
         "-Wl,-rpath,@loader_path/../torch/lib"])
    capsys.readouterr()
    assert h["_openmp_flags"](apple, torch_dir, "linux") == ([], [])  # (no macOS recipe there)
    assert "without OpenMP" in capsys.readouterr().out

    bare = _fake_compiler(tmp_path, "noomp", _NO_OPENMP)
    assert h["_openmp_flags"](bare, torch_dir, "darwin") == ([], [])
    out = capsys.readouterr().out
    assert "-Xpreprocessor -fopenmp" in out and "one thread" in out
    monkeypatch.setenv("VIDGEN_KERNELS_CPU_FLAGS", "-march=x86-64-v3 -mtune=generic")
    assert h["_cpu_flags"](apple) == ["-march=x86-64-v3", "-mtune=generic"]  # taken as given


def test_extension_reports_openmp():
    """The extension says whether it was compiled with OpenMP (its kernels' threads); the
    status line names a build without it."""
    if vk._ext.C is None:
        pytest.skip(vk._ext.IMPORT_ERROR)
    assert isinstance(vk._ext.C.with_openmp, bool)
    if os.environ.get("CI") == "true":  # CI's compiler has OpenMP: a build without it regressed
        assert vk._ext.C.with_openmp
    assert ("without OpenMP" in vk.extension_status()) == (not vk._ext.C.with_openmp)


def test_uninitialized_memory_is_poisoned():
    """Without a GPU the suite (its pytest process; not the subprocesses some tests start) runs
    with torch's allocations poisoned (conftest.py): a fresh ``torch.empty`` of any size is NaN
    (integers: their maximum), so a kernel that reads an output buffer before writing it fails
    its reference check, as on a GPU. (A large fresh CPU allocation is otherwise zero pages:
    such a read passed by luck.)"""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the suite keeps torch's default allocation")
    for n in (7, 1 << 22):
        assert torch.empty(n).isnan().all() and torch.empty(n, dtype=torch.float16).isnan().all()
    assert torch.equal(torch.empty(5, dtype=torch.int64), torch.full((5,), 2 ** 63 - 1))
    assert torch.ones(3).new_empty(4).isnan().all() and torch.empty_like(torch.ones(9)).isnan().all()


def test_sdist_carries_every_source_the_build_and_tests_need(tmp_path):
    """The sdist packed only the ext sources setup.py lists for this machine's build (the CPU
    .cpp files): no csrc/*.h, no CUDA sources, no test helpers, so `pip install` of it failed
    ("cpu_common.h: No such file or directory"). MANIFEST.in now grafts csrc/, tests/ and .ci/:
    every tracked file of those, the packages, the benchmark suite's code and the build files are
    in it (built here with the extension off, so the manifest alone must carry csrc/), and no
    compiled object or committed benchmark result is."""
    import shutil
    import tarfile
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. tests run from an unpacked sdist)")
    src = tmp_path / "src"
    for f in tracked:
        if f.startswith("benchmarks/results/") or not os.path.isfile(os.path.join(ROOT, f)):
            continue
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    dist = tmp_path / "dist"
    env = dict(os.environ, VIDGEN_KERNELS_NO_EXT="1")
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                        "print(b.build_sdist(sys.argv[1]))", str(dist)],
                       cwd=src, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    name = r.stdout.split()[-1]
    with tarfile.open(dist / name) as tar:
        top = name[:-len(".tar.gz")] + "/"
        packed = {m.name[len(top):] for m in tar.getmembers() if m.isfile()}
    want = {f for f in tracked
            if f.startswith(("csrc/", "tests/", ".ci/", "vidgen/", "vidgen_kernels/"))
            or (f.startswith("benchmarks/") and f.count("/") == 1 and f.endswith((".py", ".sh")))
            or f in ("setup.py", "pyproject.toml", "MANIFEST.in", "Makefile", "README.md")}
    assert {f for f in want if f.startswith("csrc/")} >= {"csrc/cpu_common.h", "csrc/moe_cuda.cu"}
    assert not want - packed, sorted(want - packed)
    assert not {f for f in packed if f.endswith((".so", ".o", ".pyc"))
                or f.startswith("benchmarks/results/")}, sorted(packed)
