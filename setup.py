"""Build of the compiled extension ``vidgen_kernels._C``.

* The C++ CPU kernels (OpenMP) are always built. OpenMP: ``-fopenmp``; on macOS, where Apple's
  clang rejects it, ``-Xpreprocessor -fopenmp`` with torch's own ``omp.h`` / ``libomp``; where
  neither builds a test program, without OpenMP (one thread, with a warning).
* The CUDA kernels are built when torch was built with CUDA and ``nvcc`` is found.
  ``VIDGEN_KERNELS_BUILD_CUDA=1`` forces them (and fails loudly if impossible),
  ``VIDGEN_KERNELS_BUILD_CUDA=0`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` is honoured; when unset we pick "8.0;9.0+PTX" ourselves so the build
  never queries a GPU (torch's default would).
* ``VIDGEN_KERNELS_CPU_FLAGS`` replaces the default CPU code-generation flag (``-march=native``,
  or ``-mcpu=native`` where the compiler takes only that: clang on Arm / Apple silicon).
  The CPU features those flags let the compiler use are recorded next to the library
  (``vidgen_kernels/_C.cpu_features``); on a CPU without one of them ``import vidgen_kernels``
  leaves the extension unloaded and says which (instead of a SIGILL at the first kernel call).
* ``VIDGEN_KERNELS_NO_EXT=1`` builds nothing (pure-PyTorch and Triton paths only).
* No debug information (``-g0`` after Python's own ``-g``: the library is 1.3 MB instead of
  38 MB); ``VIDGEN_KERNELS_DEBUG=1`` keeps it.

Packages: ``vidgen_kernels*`` and ``vidgen*`` from the source tree, plus the benchmark suite:
``benchmarks/`` is installed as ``vidgen_kernels._bench_suite`` (its ``*.py`` files only; not
``benchmarks/results/`` or ``benchmarks/report/``) so that ``python -m vidgen_kernels.bench`` works
without a checkout. ``benchmarks/`` stays the only copy in the source tree.

Install with ``pip install --no-build-isolation .`` (or ``-e .``).
"""
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def _fix_cuda_home():
    """torch takes CUDA_HOME from the variable, else from ``nvcc``'s grandparent folder, else
    /usr/local/cuda. An ``nvcc`` installed as /usr/local/bin/nvcc (this team's machines) makes
    that /usr/local, which has no CUDA headers, and the binding fails to compile
    (``cuda_runtime_api.h: No such file``). Then, if unset, point CUDA_HOME at /usr/local/cuda.
    Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    header = os.path.join("include", "cuda_runtime_api.h")
    if not os.path.exists(os.path.join(guess, header)) and \
            os.path.exists(os.path.join("/usr/local/cuda", header)):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


# Compiler macros of x86 instruction-set extensions -> the name Linux gives the feature in the
# ``flags`` line of /proc/cpuinfo (vidgen_kernels/_ext.py compares the two at import).
_ISA_MACROS = {
    "SSE3": "pni", "SSSE3": "ssse3", "SSE4_1": "sse4_1", "SSE4_2": "sse4_2", "POPCNT": "popcnt",
    "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI": "bmi1", "BMI2": "bmi2",
    "LZCNT": "abm", "MOVBE": "movbe", "AVXVNNI": "avx_vnni", "GFNI": "gfni", "VAES": "vaes",
    "VPCLMULQDQ": "vpclmulqdq", "AVX512F": "avx512f", "AVX512CD": "avx512cd",
    "AVX512DQ": "avx512dq", "AVX512BW": "avx512bw", "AVX512VL": "avx512vl",
    "AVX512IFMA": "avx512ifma", "AVX512VBMI": "avx512vbmi", "AVX512VBMI2": "avx512_vbmi2",
    "AVX512VNNI": "avx512_vnni", "AVX512BITALG": "avx512_bitalg",
    "AVX512VPOPCNTDQ": "avx512_vpopcntdq", "AVX512BF16": "avx512_bf16",
    "AVX512FP16": "avx512_fp16", "AMX_TILE": "amx_tile", "AMX_BF16": "amx_bf16",
    "AMX_INT8": "amx_int8",
}


FEATURES_FILE = "_C.cpu_features"


def _cxx_compiler() -> list:
    """The C++ compiler torch's extension build runs (``CXX`` or ``c++``), as an argument list
    (``CXX="ccache g++"`` included)."""
    import shlex
    from torch.utils import cpp_extension
    get = getattr(cpp_extension, "get_cxx_compiler", None)
    return shlex.split(get() if get is not None else os.environ.get("CXX", "c++"))


def _cpu_features(compiler: list, flags: list):
    """The /proc/cpuinfo names of the x86 features ``flags`` let ``compiler`` use beyond x86-64's
    baseline (its predefined ``__AVX2__``-style macros): [] for a baseline build
    (``-march=x86-64``); None where it cannot tell (the compiler query failed, not x86)."""
    import subprocess
    try:
        out = subprocess.run([*compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    macros = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
    if not {"__x86_64__", "__i386__"} & macros:
        return None
    return sorted(name for m, name in _ISA_MACROS.items() if f"__{m}__" in macros)


_OPENMP_PROBE = r"""
#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return n > 0 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""
_PLAIN_PROBE = "int main() { return 0; }\n"


def _compiles(compiler: list, cxx_args: list, link_args: list = (), source: str = _PLAIN_PROBE) -> bool:
    """Whether ``compiler`` compiles and links ``source`` (C++) with these flags (nothing runs:
    a probe of what the toolchain accepts)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            r = subprocess.run([*compiler, *cxx_args, src, "-o", os.path.join(d, "probe"),
                                *link_args], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
    return r.returncode == 0


def _cpu_flags(compiler: list) -> list:
    """``VIDGEN_KERNELS_CPU_FLAGS`` if set, else the first of ``-march=native`` (GCC, clang on
    x86) and ``-mcpu=native`` (clang on Arm, Apple's included) the compiler accepts, else none."""
    env = os.environ.get("VIDGEN_KERNELS_CPU_FLAGS")
    if env is not None:
        return env.split()
    for flag in ("-march=native", "-mcpu=native"):
        if _compiles(compiler, [flag]):
            return [flag]
    print("warning: the compiler takes neither -march=native nor -mcpu=native: the C++ CPU "
          "kernels are built for the compiler's default target (set VIDGEN_KERNELS_CPU_FLAGS)")
    return []


def _openmp_flags(compiler: list, torch_dir: str, system: str = sys.platform):
    """``(compile flags, link flags)`` that give the C++ kernels OpenMP (``at::parallel_for``
    runs on torch's threads only in code compiled with it): ``-fopenmp`` (GCC, LLVM clang);
    on macOS, Apple's clang takes ``-Xpreprocessor -fopenmp`` with the ``omp.h`` and
    ``libomp`` torch's wheel ships (torch/include, torch/lib). ``([], [])`` when neither
    builds: the kernels are then compiled without OpenMP and run on one thread
    (``vidgen_kernels._C.with_openmp`` is False; ``python -m vidgen_kernels`` says so)."""
    candidates = [(["-fopenmp"], ["-fopenmp"])]
    if system == "darwin":
        inc, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
        # rpath: this torch's lib/, and torch's place beside the installed package (a wheel
        # built here and installed elsewhere)
        candidates.append((["-Xpreprocessor", "-fopenmp", f"-I{inc}"],
                           [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}",
                            "-Wl,-rpath,@loader_path/../torch/lib"]))
    for cxx, link in candidates:
        if _compiles(compiler, cxx, link, _OPENMP_PROBE):
            return cxx, link
    print("warning: the compiler builds no OpenMP program (tried "
          + "; ".join(" ".join(c) for c, _ in candidates)
          + "): the C++ CPU kernels are built without OpenMP and run on one thread")
    return [], []


def _extensions():
    if _env_flag("VIDGEN_KERNELS_NO_EXT"):
        return [], {}
    _fix_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = _env_flag("VIDGEN_KERNELS_BUILD_CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    can_cuda = torch.version.cuda is not None and bool(nvcc)
    if want_cuda and not can_cuda:
        raise RuntimeError(
            "VIDGEN_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found={bool(nvcc)}. "
            "Install a CUDA build of torch and the CUDA toolkit, or set VIDGEN_KERNELS_BUILD_CUDA=0."
        )
    build_cuda = can_cuda if want_cuda is None else want_cuda

    compiler = _cxx_compiler()
    torch_dir = os.path.dirname(torch.__file__)
    debug = bool(_env_flag("VIDGEN_KERNELS_DEBUG"))
    # no -std=: torch's BuildExtension adds the standard its headers want (C++20 for torch 2.13;
    # torch >= 2.14's headers refuse C++17 with an #error). The CPU and OpenMP flags are added
    # by build_ext below, where a build runs (their compiler probes cost nothing to egg_info /
    # sdist).
    cxx = ["-O3", *([] if debug else ["-g0"])]
    sources = ["csrc/bindings.cpp", "csrc/adaln_cpu.cpp", "csrc/temporal_attention_cpu.cpp",
               "csrc/rope_cpu.cpp", "csrc/moe_cpu.cpp", "csrc/attention_cpu.cpp"]
    define_macros = []
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += ["csrc/adaln_cuda.cu", "csrc/rope_cuda.cu", "csrc/moe_cuda.cu",
                    "csrc/cuda_bindings.cpp"]
        define_macros.append(("VIDGEN_WITH_CUDA", None))
        ext = CUDAExtension(
            "vidgen_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension(
            "vidgen_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
        )
    base = BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))

    class build_ext(base):
        """Adds the CPU and OpenMP flags the compiler takes (:func:`_cpu_flags`,
        :func:`_openmp_flags`), and writes ``_C.cpu_features`` beside the library (in the build
        folder, and in the source tree for ``--inplace`` / editable installs): the CPU features
        the code may use."""

        def build_extension(self, extension):
            # (appended: BuildExtension has already added its own flags, -std, the ABI, ...)
            cpu_flag = _cpu_flags(compiler)
            omp_cxx, omp_link = _openmp_flags(compiler, torch_dir)
            extension.extra_compile_args["cxx"] += omp_cxx + cpu_flag
            extension.extra_link_args += omp_link
            lib = self.get_ext_fullpath(extension.name)
            before = os.stat(lib).st_mtime_ns if os.path.exists(lib) else None
            super().build_extension(extension)
            path = os.path.join(os.path.dirname(lib), FEATURES_FILE)
            after = os.stat(lib).st_mtime_ns if os.path.exists(lib) else None
            if after is None or after == before:
                # not rebuilt (distutils found it up to date: without ninja a change of
                # VIDGEN_KERNELS_CPU_FLAGS alone rebuilds nothing): its record stands
                return
            features = _cpu_features(compiler, cpu_flag)
            if features is None and platform.machine().lower() in ("x86_64", "amd64"):
                print(f"warning: could not list the CPU features of {' '.join(cpu_flag)} "
                      f"(compiler {' '.join(compiler)}); the import-time CPU check is off")
            with open(path, "w") as f:
                f.write(f"# CPU features vidgen_kernels._C was compiled to use "
                        f"({' '.join(cpu_flag)})\n{' '.join(features or [])}\n")

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            src = os.path.join(self.build_lib, "vidgen_kernels", FEATURES_FILE)
            dst_dir = self.get_finalized_command("build_py").get_package_dir("vidgen_kernels")
            if os.path.exists(src):
                self.copy_file(src, os.path.join(dst_dir, FEATURES_FILE), level=self.verbose)

    return [ext], {"build_ext": build_ext}


# The benchmark suite ships inside the package (see vidgen_kernels/bench.py). benchmarks/ has no
# __init__.py on purpose (pytest imports its files as top-level modules next to conftest.py), so
# it becomes a namespace subpackage: build_py copies its *.py files, nothing else.
BENCH_SUITE = "vidgen_kernels._bench_suite"
packages = find_packages(include=["vidgen_kernels", "vidgen_kernels.*", "vidgen", "vidgen.*"])
packages.append(BENCH_SUITE)

ext_modules, cmdclass = _extensions()
setup(
    packages=packages,
    package_dir={BENCH_SUITE: "benchmarks"},
    # only the suite's modules: no results/, report/ (generated), last.json, README.md or gpu.sh
    exclude_package_data={BENCH_SUITE: ["*", "*/*", "*/*/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
