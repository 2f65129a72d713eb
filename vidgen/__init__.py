"""vidgen: generator models built on vidgen_kernels, schedulers, CFG sampling and the demo.

Video tensors are ``[B, T, C, H, W]`` throughout. The models call only the public API of
``vidgen_kernels`` (``adaln_modulate``, ``rope3d_attention``, ``rope3d_freqs``, ``nn.AdaLNZero``,
``nn.RoPE3DAttention``, ``nn.CausalTemporalAttention``, ``nn.MoEFFN``), never a backend directly;
a model built with ``backend="reference"`` (or with ``model.backend = "reference"`` set later)
runs its forward inside ``vidgen_kernels.use_backend("reference")``: the pure-PyTorch path of
the same model and weights. Each block of ``model.blocks`` enters that backend too, so that
activation checkpointing of the blocks (``torch.utils.checkpoint``, ``checkpoint_wrapper``)
recomputes them with the same kernels; blocks take and return tensors at the top level (what
reentrant checkpointing tracks), and the MoE layers keep the forward's losses (``aux_loss``), not
the recompute's. Under reentrant checkpointing ``aux_loss`` carries no gradient (PyTorch
differentiates only the wrapped function's outputs): prefer ``use_reentrant=False``.

Modules:

* ``vidgen.schedulers``: ``FlowMatchingScheduler``, ``DDPMScheduler``.
* ``vidgen.models``: ``SmallVideoVAE`` (per-frame 2D conv VAE), ``LatentVideoDiT`` (+ presets
  ``LatentVideoDiT_S/M/L/XL``), ``VideoCausalDiT`` (frame-causal, per-frame timesteps, MoE FFN).
  The MoE FFN is ``vidgen_kernels.nn.MoEFFN`` when ``hasattr(vidgen_kernels.nn, "MoEFFN")``, else
  the pure-PyTorch ``vidgen.models.ReferenceMoE`` with the same ``forward(x, context)`` and
  ``aux_loss`` (not its parameter names, ``z_loss`` or ``tokens_per_expert``).
* ``vidgen.pipelines``: ``generate_video`` / ``generate_image`` (CFG with cond + null batched in
  one forward, seeds / ``torch.Generator``, VAE decoding).
* ``vidgen.training``: ``EMA``, ``cfg_dropout``, ``flow_matching_loss``, ``make_optimizer``,
  ``save_checkpoint`` / ``load_checkpoint`` (safetensors, a declared dependency; without it a
  ``.pt`` file by ``torch.save``, with a warning naming it).
* ``vidgen.demo``: ``python -m vidgen demo`` / ``vidgen demo`` / ``make demo``.
"""
__version__ = "0.1.0"
