"""Checkpoint I/O: HF directories in (every family), converted orbax directories, HF directories out.

  families.py     the family table: model_type -> parse(config.json) -> ModelConfig
  safetensors.py  lazy reading of safetensors (Lazy, TensorSource), errors that name the file
  hf.py           HF weights -> param tree, read from the weight declarations (model/weights.py)
  export.py       param tree -> HF directory (the same declarations, inverted)
  checkpoint.py   our converted format (orbax params + config), written atomically
  atomic.py       the one atomic directory writer
  mxfp4.py        exact MXFP4 dequantization (gpt-oss experts)
"""
