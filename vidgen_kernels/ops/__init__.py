"""Kernel op families, one module each (kernel launchers, custom ops, references)."""
