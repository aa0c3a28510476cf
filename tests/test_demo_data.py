"""Fast tests for the demo corpus, tokenizer and data pipeline.

The tokenizer is trained on a small slice of the training files with a small
vocabulary (well under a second) instead of the full 4096-token demo setup.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from rewire_jax.demo import corpus, data
from rewire_jax.demo import tokenizer as demo_tokenizer

_SMALL_VOCAB = 512
_N_TOKENIZER_FILES = 25


@pytest.fixture(scope="module")
def small_files() -> list[pathlib.Path]:
    # Every 20th training file: a spread of packages, still tiny.
    return corpus.train_files()[::20][:_N_TOKENIZER_FILES]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, small_files) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tok")
    demo_tokenizer.train_tokenizer(_SMALL_VOCAB, out_dir=out, files=small_files)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# --------------------------------------------------------------------- corpus


def test_split_is_deterministic_and_disjoint():
    train, held = corpus.train_files(), corpus.heldout_files()
    assert train == corpus.train_files() and held == corpus.heldout_files()
    assert not set(train) & set(held)
    assert sorted(train + held, key=corpus.rel_path) == corpus.stdlib_files()
    # Sorted by relative path, which is what makes the order machine-independent.
    assert [corpus.rel_path(p) for p in train] == sorted(corpus.rel_path(p) for p in train)
    # The split is a pure function of the relative path (~5% held out).
    assert all(corpus.is_heldout(corpus.rel_path(p)) for p in held)
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10


def test_exclusions():
    rels = [corpus.rel_path(p) for p in corpus.train_files() + corpus.heldout_files()]
    assert corpus.PROSE_REL_PATH not in rels
    assert (corpus.stdlib_root() / corpus.PROSE_REL_PATH).is_file()
    for rel in rels:
        dirs = rel.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(dirs), rel
        assert rel.endswith(".py")
    assert "os.py" in rels and "json/decoder.py" in rels
    # Build-specific generated files differ between machines: never in the corpus.
    for rel in rels:
        assert not rel.split("/")[-1].startswith("_sysconfigdata_"), rel
        assert not any(part.startswith("config-3.") for part in rel.split("/")[:-1]), rel
    assert all(p.stat().st_size <= corpus.MAX_FILE_BYTES for p in corpus.stdlib_files())


def test_prose_text_is_english_not_python():
    text = corpus.prose_text()
    assert text == corpus.prose_text()
    assert len(text) > 10_000
    assert "topics = {" not in text and "The \"assert\" statement" in text
    assert len(corpus.prose_topics()) > 10


def test_fingerprint_is_stable_hex():
    fp = corpus.corpus_fingerprint()
    assert fp == corpus.corpus_fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0


# ------------------------------------------------------------------ tokenizer


def test_special_token_ids(tok):
    assert tok.eos_token == demo_tokenizer.EOS_TOKEN and tok.eos_token_id == 0
    assert tok.pad_token == demo_tokenizer.PAD_TOKEN and tok.pad_token_id == 1
    assert len(tok) == _SMALL_VOCAB
    # Nothing is added implicitly (no BOS/EOS from a post-processor).
    assert 0 not in tok("x = 1")["input_ids"]


def test_autotokenizer_loads_saved_dir(tok_dir, tok, small_files):
    assert (tok_dir / "tokenizer.json").is_file()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == demo_tokenizer.EOS_TOKEN
    # Loading the directory reproduces the in-memory tokenizer exactly.
    fresh = demo_tokenizer.train_tokenizer(_SMALL_VOCAB, files=small_files)
    text = corpus.read_text(corpus.heldout_files()[0])
    assert tok(text)["input_ids"] == fresh(text)["input_ids"]


def test_tokenizer_training_is_deterministic(tmp_path, tok_dir, small_files):
    demo_tokenizer.train_tokenizer(_SMALL_VOCAB, out_dir=tmp_path, files=small_files)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_tokenizer_round_trips_heldout_text_exactly(tok):
    texts = [corpus.read_text(p) for p in corpus.heldout_files()]
    # Whitespace-sensitive and unseen characters must survive too.
    texts.append("def f(x) :\n\treturn x . y  # héllo ☃ 日本 \r\n\n   ")
    texts.append(corpus.prose_text()[:20_000])
    for text, ids in zip(texts, data.encode_texts(tok, texts)):
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------- data


def test_encode_files_layout(tok):
    files = corpus.heldout_files()[:5]
    stream = data.encode_files(tok, files)
    assert stream.dtype == np.int32 and stream.ndim == 1
    eos_positions = np.flatnonzero(stream == tok.eos_token_id)
    assert len(eos_positions) == len(files) and stream[-1] == tok.eos_token_id
    # Documents between separators decode to the files' text.
    docs = np.split(stream, eos_positions[:-1] + 1)
    assert [tok.decode(d[:-1]) for d in docs] == [corpus.read_text(p) for p in files]


def test_literal_special_token_text_is_not_a_separator(tok):
    (ids,) = data.encode_texts(tok, ["a <|endoftext|> b <|pad|>"])
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids


def test_batches_are_deterministic_for_a_seed():
    stream = np.arange(1000, dtype=np.int32)
    take = lambda seed: [b for b, _ in zip(data.batches(stream, 4, 16, seed), range(3))]
    first, again, other = take(0), take(0), take(1)
    assert all(b.shape == (4, 17) and b.dtype == np.int32 for b in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    # Each row is a contiguous window of the stream.
    for b in first:
        assert np.all(np.diff(b, axis=1) == 1) and b.min() >= 0 and b.max() < 1000
    with pytest.raises(ValueError):
        next(data.batches(stream[:10], 1, 16, 0))


def test_documents_truncate_and_skip(tok):
    files = corpus.heldout_files()[:10]
    lengths = [len(ids) for ids in data.encode_texts(tok, [corpus.read_text(p) for p in files])]
    min_tokens = sorted(lengths)[3]  # forces at least 3 files to be skipped
    docs = data.documents(tok, files, min_tokens=min_tokens, max_tokens=100)
    kept = [n for n in lengths if n >= min_tokens]
    assert len(docs) == len(kept) >= 1
    assert all(d.dtype == np.int32 and len(d) == min(100, n) for d, n in zip(docs, kept))
