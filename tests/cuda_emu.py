"""The CUDA C++ kernels (csrc/*.cu) run on the CPU, for tests: no GPU needed.

:func:`load` rewrites every ``csrc/*.cu`` into plain C++ (the ``<<<grid, block, smem,
stream>>>`` launches become calls of the emulator, ``extern __shared__`` arrays its dynamic
shared memory and static ``__shared__`` arrays the emulator's per-block (poisoned) shared
memory, ``__launch_bounds__`` a check at kernel entry), compiles them with
``tests/cuda_emu_src/`` in front of the include path (its ``cuda_runtime.h`` / ``cuda_fp16.h`` /
``cuda_bf16.h`` are the emulator: one fiber per CUDA thread, real barriers and warp shuffles,
launch limits; see ``vidgen_cuda_emu.h``) together with ``csrc/cuda_bindings.cpp`` (built with
``VIDGEN_CUDA_EMU``: the same bindings, taking CPU tensors), and returns the module. It has the
``vidgen_kernels._C`` CUDA entry points (``adaln_fwd_cuda``, ``rope_cuda``, ``moe_route_cuda``,
...; pass ``stream=0``) and the emulator's controls (``set_schedule``, ``set_optin_smem``,
``reset``, ``stats``).

The kernels' own code runs unchanged: indexing, vector paths, reductions, conversions, the
launch-time choices of the host code. What a GPU adds (timing, the memory model) is not here.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu_src"
CU_SOURCES = ("adaln_cuda.cu", "rope_cuda.cu", "moe_cuda.cu")


def _match(s: str, at: int, step: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index of the bracket matching the one at ``at``: scanning forward (``step`` 1) from an
    ``open_ch``, or backward (``step`` -1) from a ``close_ch``."""
    depth = 0
    i = at
    while 0 <= i < len(s):
        if s[i] == open_ch:
            depth += step
        elif s[i] == close_ch:
            depth -= step
        if depth == 0:
            return i
        i += step
    raise ValueError(f"unbalanced {open_ch}{close_ch} at offset {at}")


def _pad(original: str, new: str) -> str:
    """``new`` with the newlines of ``original`` it lacks appended (keeps line numbers)."""
    return new + "\n" * max(0, original.count("\n") - new.count("\n"))


def _rewrite_launches(s: str) -> str:
    out, pos = [], 0
    while True:
        i = s.find("<<<", pos)
        if i < 0:
            break
        # the kernel expression before <<<: identifier, optionally with <template args>
        j = i - 1
        while s[j].isspace():
            j -= 1
        if s[j] == ">":
            j = _match(s, j, -1, "<", ">") - 1
        k = j
        while k >= 0 and (s[k].isalnum() or s[k] in "_:"):
            k -= 1
        callee_start = k + 1
        callee = re.sub(r"\s+", " ", s[callee_start:i].strip())
        cfg_end = s.index(">>>", i)
        cfg = s[i + 3:cfg_end]
        a0 = cfg_end + 3
        while s[a0].isspace():
            a0 += 1
        if s[a0] != "(":
            raise ValueError(f"kernel launch without arguments at offset {i}")
        a1 = _match(s, a0, 1)
        args = s[a0 + 1:a1]
        original = s[callee_start:a1 + 1]
        new = (f"::vidgen_emu::launch(::vidgen_emu::cfg({cfg}), ::vidgen_emu::fn_id({callee}), "
               f"[&]() {{ {callee}({args}); }})")
        out.append(s[pos:callee_start])
        out.append(_pad(original, new))
        pos = a1 + 1
    out.append(s[pos:])
    return "".join(out)


def _rewrite_launch_bounds(s: str) -> str:
    out, pos = [], 0
    while True:
        i = s.find("__launch_bounds__(", pos)
        if i < 0:
            break
        p0 = i + len("__launch_bounds__")
        p1 = _match(s, p0, 1)
        bound = s[p0 + 1:p1].split(",")[0]  # (max threads[, min blocks])
        body = s.index("{", p1)
        out.append(s[pos:i])
        out.append(s[p1 + 1:body + 1])
        out.append(f" VIDGEN_EMU_LAUNCH_BOUNDS(({bound}));")
        pos = body + 1
    out.append(s[pos:])
    return "".join(out)


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>]+)\s+(\w+)\s*\[\s*\]\s*;")


_STATIC_SHARED = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)((?:\s*\[[^\]]+\])+)\s*;")


def rewrite(source: str, name: str) -> str:
    """A .cu file as C++ for the emulator (line numbers kept: errors point at the .cu file)."""
    s = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                                     f"reinterpret_cast<{m.group(1)}*>(::vidgen_emu::dynamic_smem());",
                           source)
    s = _STATIC_SHARED.sub(lambda m: f"static {m.group(1)} {m.group(2)}{m.group(3)}; "
                                     f"::vidgen_emu::shared_static({m.group(2)}, sizeof({m.group(2)}));",
                           s)
    s = _rewrite_launch_bounds(s)
    s = _rewrite_launches(s)
    return f'#line 1 "{name}"\n' + s


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


_MODULE = None


def load(verbose: bool = False):
    """Build (once per source state; cached under ``build/cuda_emu``) and import the module."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    from torch.utils.cpp_extension import load as cpp_load

    inputs = ([CSRC / n for n in CU_SOURCES] + [CSRC / "cuda_bindings.cpp"] + list(CSRC.glob("*.h"))
              + list(CSRC.glob("*.cuh")) + list(EMU.glob("*")))
    tag = _digest([p for p in inputs if p.is_file()])
    build = ROOT / "build" / "cuda_emu" / tag
    if build.parent.is_dir():  # builds of earlier source states
        for old in build.parent.iterdir():
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in [CSRC / n for n in CU_SOURCES] + [EMU / "selftest.cu"]:
        n = path.name
        dst = src / (n[:-3] + "_emu.cpp")
        text = rewrite(path.read_text(), str(path.relative_to(ROOT)))
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        sources.append(str(dst))
    sources += [str(CSRC / "cuda_bindings.cpp"), str(EMU / "module.cpp")]  # compiled as they are
    flags = ["-O1", "-std=c++17", "-DVIDGEN_CUDA_EMU", "-ffp-contract=off", "-fno-strict-aliasing",
             "-Wno-unused-function"]
    san = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
    kw = dict(sources=sources, extra_include_paths=[str(EMU), str(CSRC)], verbose=verbose)
    try:  # with UBSan's alignment check (misaligned vector accesses abort, as they fault on a GPU)
        _MODULE = cpp_load(name=f"vidgen_cuda_emu_{tag}", extra_cflags=flags + san,
                           extra_ldflags=san[:1], build_directory=str(build), **kw)
    except Exception as e:  # a toolchain without the UBSan runtime: build without the check
        if "sanitize" not in str(e) and "ubsan" not in str(e).lower():
            raise
        nosan = build / "nosan"
        nosan.mkdir(exist_ok=True)
        _MODULE = cpp_load(name=f"vidgen_cuda_emu_{tag}_nosan", extra_cflags=flags,
                           build_directory=str(nosan), **kw)
    return _MODULE


if __name__ == "__main__":  # python tests/cuda_emu.py: build and print the module's entry points
    m = load(verbose=bool(os.environ.get("VERBOSE")))
    print(m.__file__)
    print(sorted(n for n in dir(m) if not n.startswith("_")))
