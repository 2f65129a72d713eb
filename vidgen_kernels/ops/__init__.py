"""Kernel op families, one module each (kernel launchers, custom ops, references); _eager.py
is the eager fast path every family's public functions call their custom ops through."""
