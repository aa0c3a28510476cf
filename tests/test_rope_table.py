"""RoPE's torch-computed frequency tables kept on disk (rewire_jax.model.rope_table)."""
import numpy as np
import pytest

from rewire_jax.model import layers, rope_table


def _torch_table(theta: float, dim: int) -> np.ndarray:
    """The oracle: transformers' own fp32 computation."""
    torch = pytest.importorskip("torch")
    return (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)).numpy()


@pytest.fixture
def kept(tmp_path):
    rope_table.keep(tmp_path)
    yield tmp_path
    rope_table.keep(None)


def test_tables_are_torchs_and_read_back(kept):
    want = _torch_table(500000.0, 130)
    first = rope_table.pos_freqs(500000.0, 130)
    files = list(kept.glob("pos-freqs-500000.0-130-torch-*.npy"))
    assert len(files) == 1 and np.array_equal(first.view(np.uint32), want.view(np.uint32))
    np.save(files[0], np.full(65, 7.0, np.float32))   # a kept table is what is used...
    assert (rope_table.pos_freqs(500000.0, 130) == 7.0).all()
    files[0].write_bytes(b"not an npy file")           # ...unless unreadable: computed again, rewritten
    again = rope_table.pos_freqs(500000.0, 130)
    assert np.array_equal(again.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(np.load(files[0]).view(np.uint32), want.view(np.uint32))
    assert not list(kept.glob(".*.tmp"))


def test_nothing_kept_by_default(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    rope_table.keep(None)
    monkeypatch.chdir(tmp_path)
    layers._pos_freqs(10000.0, 48)
    assert not list(tmp_path.rglob("*"))


def test_unwritable_directory_keeps_nothing(tmp_path):
    want = _torch_table(10000.0, 64)
    (tmp_path / "file").write_text("")
    rope_table.keep(tmp_path / "file" / "sub")   # mkdir fails: the table is still torch's
    try:
        got = rope_table.pos_freqs(10000.0, 64)
    finally:
        rope_table.keep(None)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_rope_inv_freq_is_one_object_across_threads(monkeypatch):
    """Two threads tracing at once (the CLI's --compare) must get the same array: JAX makes one
    program constant of it only when it is the same object, else the program (and its
    persistent-cache key) depends on which thread came first."""
    import threading
    import time

    from rewire_jax.model.config import RopeConfig

    slow = layers._pos_freqs
    monkeypatch.setattr(layers, "_pos_freqs", lambda *a: (time.sleep(0.2), slow(*a))[1])
    rope = RopeConfig(theta=12345.0)   # a key no other test has cached
    got = [None] * 4

    def ask(i):
        got[i] = layers.rope_inv_freq(rope, 32)[0]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(g is got[0] for g in got)
