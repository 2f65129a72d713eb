"""The MoE forward-mode pipeline, kept from dynamo: imported on its first use, so that
``import vidgen_kernels`` does not import ``torch._dynamo`` (``torch.compiler.disable`` does,
~1 s). A compiled jvp of :func:`~vidgen_kernels.moe_ffn` breaks the graph in the reference loop
and resumes in :func:`~vidgen_kernels.ops.moe.moe_pipeline` eagerly; dynamo must not trace the raw
kernel calls of this path (a warning and a graph break per kernel)."""
import torch

from .moe import _pipeline_forward_ad

pipeline_forward_ad = torch.compiler.disable(_pipeline_forward_ad)
