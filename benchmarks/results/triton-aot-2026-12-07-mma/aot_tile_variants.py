import dataclasses, os, sys
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import vidgen_kernels.backends as backends
from vidgen_kernels.triton_kernels import _launch, aot_check as ac
why = backends.why_unavailable
backends.why_unavailable = lambda name, device=None: None if name == "triton" else why(name, device)
os.environ["TRITON_INTERPRET"] = "1"  # make_cases: CPU cases exist under the interpreter flag only
import test_bench_tiles as T
cases = T.make_cases(True, ["cpu"])
del os.environ["TRITON_INTERPRET"]
T._interpreting = lambda: False
rec = ac.Recorder(None); rec.install()
for arch in [int(a) for a in sys.argv[1].split(",")]:
    rec.arch = arch
    driver.set_active(ac._TargetDriver(GPUTarget("cuda", arch, 32), ac.SHARED_LIMIT[arch]))
    _launch._STAGES_FALLBACK.clear()
    for c in cases:
        if c.contender == "dense": continue
        c = dataclasses.replace(c, dtype=torch.bfloat16)
        n0 = len(rec.seen)
        try:
            inp = T.make_inputs(c)
            T.step_fn(c, inp)()
            err = ""
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:300]}"
        new = [x for x in list(rec.seen.values())[n0:] if "preprocess" not in x.kernel]
        for x in new:
            print(f"sm{arch} {c.kernel:16s} {c.label:10s} {c.contender:24s} {x.kernel:18s} regs={x.regs} stack={x.stack_bytes} shared={x.shared}{' OVER' if x.over_shared else ''} wgmma={x.wgmma} mma.sync={x.mma_sync}")
        if err: print(f"sm{arch} {c.kernel} {c.label} {c.contender} ERROR {err}")
