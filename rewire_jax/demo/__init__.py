"""Demo model support: a self-contained corpus, tokenizer and data pipeline.

The demo trains a small OLMoE-architecture model on the Python standard library
of the running interpreter, which exists on every machine without downloads.
"""
from pathlib import Path

#: the bundled demo model (trained by `python -m rewire_jax.demo.train`): the CLI's default model
DEMO_MODEL = Path(__file__).parent / "model"
