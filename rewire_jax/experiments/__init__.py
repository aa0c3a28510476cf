"""Experiments that measure what rewiring does (run as `python -m rewire_jax.experiments.<name>`)."""
