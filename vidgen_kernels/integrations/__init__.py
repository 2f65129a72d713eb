"""Integrations of vidgen_kernels with third-party model libraries.

Each submodule imports its library lazily; importing ``vidgen_kernels`` (or this package) never
imports them. ``vidgen_kernels.integrations.diffusers``: ``apply(model)`` / ``remove(model)`` for
diffusers' ``CogVideoXTransformer3DModel`` and ``WanTransformer3DModel``.
"""
