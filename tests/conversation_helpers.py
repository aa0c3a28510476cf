"""Shared pieces of the conversation tests: the demo model (loaded once per process), its chat
template, short options so that every test stays within a few context buckets."""
import functools
from pathlib import Path

import numpy as np

import rewire_jax
from rewire_jax import RewireOptions

ROOT = Path(__file__).parent.parent
TEMPLATE_FILE = ROOT / "rewire_jax" / "demo" / "chat_template.jinja"
TEMPLATE = TEMPLATE_FILE.read_text()
OPTS = RewireOptions(interval=4, steps=2)
TURNS = ["def add(a, b):", "now multiply", "and divide"]
NEW = 6


@functools.lru_cache(maxsize=None)
def demo_model():
    return rewire_jax.load(ROOT / "rewire_jax" / "demo" / "model")


def assert_same(reply, result, atol=1e-5):
    """A conversation's reply equals a generate() result (tokens, deltas, phase schedule)."""
    assert reply.tokens == result.tokens[0]
    assert np.abs(reply.deltas - result.deltas[0]).max() <= atol
    assert [p["context_len"] for p in reply.phases] == [int(p.context_len[0]) for p in result.phases]
