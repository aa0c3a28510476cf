"""Byte-level BPE tokenizer for the stdlib demo corpus.

Design choices (and why):

* **Byte-level BPE** (GPT-2 style) with the full 256-byte initial alphabet:
  every string, including prose and non-ASCII text the tokenizer never saw,
  encodes without ``<unk>`` and decodes back *exactly*.
* **No normalizer, no prefix space** (``add_prefix_space=False``): source code
  is whitespace-sensitive, so ``decode(encode(x)) == x`` must hold bit for bit.
* **Two special tokens at fixed ids**: ``<|endoftext|>`` = 0 (EOS and document
  separator) and ``<|pad|>`` = 1. No BOS; nothing is added automatically on
  encode (no post-processor), so the data pipeline controls separators.
* **Trained only on** :func:`rewire_jax.demo.corpus.train_files`, so held-out
  code and the prose set are genuinely unseen by the tokenizer too.

The result is saved in the standard Hugging Face layout (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it offline.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rewire_jax.demo import corpus

__all__ = [
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "save_tokenizer",
    "train_tokenizer",
    "wrap_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
PAD_TOKEN = "<|pad|>"
PAD_ID = 1

#: Generous upper bound on sequence length; only silences transformers'
#: "sequence longer than model_max_length" warnings when encoding whole files.
_MODEL_MAX_LENGTH = 1 << 30


def _build_untrained() -> Tokenizer:
    """Empty byte-level BPE pipeline (model + pre-tokenizer + decoder)."""
    # No unk token: the byte alphabet covers every input.
    tok = Tokenizer(models.BPE(unk_token=None))
    # use_regex=True keeps the GPT-2 split pattern (words, numbers, punctuation
    # runs, whitespace runs), which stops merges across e.g. identifier/operator
    # boundaries and keeps indentation runs as their own tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer.

    Sets ``eos_token``/``pad_token`` and disables
    ``clean_up_tokenization_spaces`` (which would otherwise rewrite e.g.
    ``"x ."`` to ``"x."`` on decode and break exact round-trips).
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=_MODEL_MAX_LENGTH,
    )


def train_tokenizer(
    vocab_size: int = 4096,
    out_dir: str | os.PathLike | None = None,
    files: Sequence[pathlib.Path] | None = None,
) -> PreTrainedTokenizerFast:
    """Train the demo byte-level BPE tokenizer.

    Training is deterministic: files are fed in sorted order and the
    ``tokenizers`` BPE trainer breaks count ties by pair, so the same files and
    ``vocab_size`` give a byte-identical ``tokenizer.json``.

    Args:
        vocab_size: Final vocabulary size, including the 256 byte tokens and
            the 2 special tokens (must be >= 258).
        out_dir: If given, save the tokenizer there (created if missing) in the
            Hugging Face layout loadable by ``AutoTokenizer.from_pretrained``.
        files: Files to train on; defaults to :func:`corpus.train_files`.
            Tests pass a small subset to keep training fast.

    Returns:
        The trained tokenizer; ``eos_token_id == 0`` and ``pad_token_id == 1``.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be >= 258 (bytes + specials), got {vocab_size}")
    files = corpus.train_files() if files is None else list(files)

    tok = _build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0 and 1 (see EOS_ID / PAD_ID).
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # All 256 byte symbols, even ones absent from the training data, so
        # unseen characters never fall off the vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    texts: Iterable[str] = (corpus.read_text(p) for p in files)
    tok.train_from_iterator(texts, trainer=trainer, length=len(files))

    hf_tok = wrap_tokenizer(tok)
    # Guard the id contract the data pipeline and model config rely on.
    assert hf_tok.eos_token_id == EOS_ID and hf_tok.pad_token_id == PAD_ID, (
        hf_tok.eos_token_id,
        hf_tok.pad_token_id,
    )
    if out_dir is not None:
        save_tokenizer(hf_tok, out_dir)
    return hf_tok


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> None:
    """Save ``tok`` to ``out_dir`` so any recent transformers loads it offline.

    transformers 5.x ``save_pretrained`` writes only ``tokenizer.json`` and a
    ``tokenizer_config.json`` naming the 5.x-only class ``TokenizersBackend``.
    We name ``PreTrainedTokenizerFast`` instead (5.x maps it to the same class,
    4.x knows it) and add ``special_tokens_map.json`` as 4.x expects, so a
    saved demo model is not tied to the transformers major version.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))

    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    special_map = out / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(
            json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2) + "\n",
            encoding="utf-8",
        )
