"""One module per HF model family: its config parser and its HF-key -> param map.

Importing this package registers every family with `rewire_jax.config.register_family` and
`rewire_jax.hf_io.register_converter`.
"""
from . import deepseek, gpt_oss, mixtral, olmoe, qwen_moe  # noqa: F401
