"""Demo model support: a self-contained corpus, tokenizer and data pipeline.

The demo trains a small OLMoE-architecture model on the Python standard library
of the running interpreter, which exists on every machine without downloads.
"""
