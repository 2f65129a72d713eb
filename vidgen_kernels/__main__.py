"""``python -m vidgen_kernels``: what this install can run."""
import torch

import vidgen_kernels as vk
from vidgen_kernels.backends import BACKENDS, why_unavailable

print(f"vidgen-kernels {vk.__version__}, torch {torch.__version__}")
print(vk.extension_status())
for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    for b in BACKENDS:
        why = why_unavailable(b, dev)
        print(f"  {dev:5s} {b:10s} {'yes' if why is None else 'no: ' + why}")
