"""``python -m vidgen_kernels``: what this install can run, per device (each visible GPU with its
architecture and shared memory per block, which the Triton tile limits depend on)."""
import torch

import vidgen_kernels as vk
from vidgen_kernels.backends import BACKENDS, shared_memory_per_block, why_unavailable

print(f"vidgen-kernels {vk.__version__}, torch {torch.__version__}")
print(vk.extension_status())
gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] \
    if torch.cuda.is_available() else []
for dev in [torch.device("cpu")] + gpus:
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev.index)
        print(f"{dev}: {torch.cuda.get_device_name(dev.index)}, sm_{major}{minor}, "
              f"{shared_memory_per_block(dev) // 1024} KiB shared memory per block")
    for b in BACKENDS:
        why = why_unavailable(b, dev)
        print(f"  {str(dev):6s} {b:10s} {'yes' if why is None else 'no: ' + why}")
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    print(f"  default backend {vk.current_backend()!r} runs ({str(dt).replace('torch.', '')}): " +
          ", ".join(f"{k} {v}" for k, v in vk.resolved_backends(dev, dt).items()))
