"""Token streams, training batches and evaluation documents for the demo model.

Conventions:

* Token ids are ``np.int32`` (what the JAX model embeds; vocabularies here are
  far below 2**31).
* Text is encoded with ``add_special_tokens=False`` and
  ``split_special_tokens=True``: nothing is added implicitly, and a literal
  ``"<|endoftext|>"`` inside a source file is tokenized as ordinary text, so
  the EOS id appears *only* where this module puts it (document boundaries).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from rewire_jax.demo import corpus

__all__ = ["batches", "documents", "encode_files", "encode_texts", "text_documents"]

# Texts per tokenizer call: large enough for the Rust batch encoder to use
# all cores, small enough that the intermediate Python lists of ids stay small.
_ENCODE_CHUNK = 64


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[np.ndarray]:
    """Tokenize each text separately, using the tokenizer's batch encoder.

    Returns:
        One ``int32`` array of shape ``[n_tokens_i]`` per text, in input order.
        No special tokens are added.
    """
    out: list[np.ndarray] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = list(texts[start : start + _ENCODE_CHUNK])
        ids = tokenizer(
            chunk,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        out.extend(np.asarray(x, dtype=np.int32) for x in ids)
    return out


def _read_all(files: Sequence[pathlib.Path]) -> list[str]:
    return [corpus.read_text(p) for p in files]


def encode_files(tokenizer: PreTrainedTokenizerBase, files: Sequence[pathlib.Path]) -> np.ndarray:
    """Encode ``files`` into one long training stream.

    Layout: ``doc_0 EOS doc_1 EOS ... doc_{n-1} EOS``. Every document is
    followed by EOS, so the model learns to end a file and a window crossing a
    boundary sees an explicit separator (the usual GPT-style packing).

    Returns:
        ``int32`` array of shape ``[sum_i (n_tokens_i + 1)]``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    if not files:
        return np.zeros((0,), dtype=np.int32)
    pieces: list[np.ndarray] = []
    sep = np.asarray([eos], dtype=np.int32)
    for ids in encode_texts(tokenizer, _read_all(files)):
        pieces.append(ids)
        pieces.append(sep)
    return np.concatenate(pieces)


def batches(
    stream: np.ndarray, batch_size: int, seq_len: int, seed: int
) -> Iterator[np.ndarray]:
    """Infinite iterator of random training windows from a token stream.

    Each row is a contiguous window of ``seq_len + 1`` tokens starting at a
    uniformly random offset (windows may cross document boundaries; EOS marks
    them). Use ``x[:, :-1]`` as inputs and ``x[:, 1:]`` as next-token targets.
    Sampling uses ``np.random.default_rng(seed)``, so the sequence of batches
    is fully determined by ``seed`` (and the stream).

    Args:
        stream: ``int`` array of shape ``[N]``, e.g. from :func:`encode_files`.
        batch_size: Rows per batch ``B``.
        seq_len: Model context length ``T``.
        seed: Seed for the numpy ``Generator``.

    Yields:
        ``int32`` arrays of shape ``[B, T + 1]`` (fresh arrays, safe to mutate).
    """
    stream = np.asarray(stream, dtype=np.int32)
    if stream.ndim != 1:
        raise ValueError(f"stream must be 1-D, got shape {stream.shape}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    window = seq_len + 1
    n_starts = stream.shape[0] - window + 1  # valid start offsets: [0, n_starts)
    if n_starts < 1:
        raise ValueError(f"stream of {stream.shape[0]} tokens is shorter than seq_len + 1 = {window}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(window, dtype=np.int64)
    while True:
        starts = rng.integers(0, n_starts, size=batch_size, dtype=np.int64)
        # Fancy indexing copies: [B, 1] + [T+1] -> [B, T+1] gather.
        yield stream[starts[:, None] + offsets[None, :]]


def text_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], min_tokens: int, max_tokens: int
) -> list[np.ndarray]:
    """Evaluation documents from raw texts (e.g. the prose topics).

    Each text is tokenized on its own (no EOS, no other special tokens), kept
    only if it has at least ``min_tokens`` tokens, then truncated to its first
    ``max_tokens`` tokens. Order follows ``texts``.

    Returns:
        List of ``int32`` arrays, each of shape ``[n]`` with
        ``min(min_tokens, max_tokens) <= n <= max_tokens``.
    """
    if min_tokens < 0 or max_tokens < 1:
        raise ValueError(f"need min_tokens >= 0 and max_tokens >= 1, got {min_tokens}, {max_tokens}")
    return [ids[:max_tokens] for ids in encode_texts(tokenizer, texts) if ids.shape[0] >= min_tokens]


def documents(
    tokenizer: PreTrainedTokenizerBase,
    files: Sequence[pathlib.Path],
    min_tokens: int,
    max_tokens: int,
) -> list[np.ndarray]:
    """Evaluation documents, one per file; see :func:`text_documents`.

    Returns:
        List of ``int32`` arrays of shape ``[n]``, ``n <= max_tokens``, in the
        order of ``files`` (skipped files simply do not appear).
    """
    return text_documents(tokenizer, _read_all(files), min_tokens, max_tokens)
