"""vidgen: the generator models built on vidgen_kernels (image MoE-DiT, causal video DiT,
CogVideoX-style expert transformer, 3D causal VAE, schedulers, CFG sampling).

The models land with their own issue; this package calls only the public API of
``vidgen_kernels`` (functions, ``vidgen_kernels.nn`` modules), never a backend directly.
"""
