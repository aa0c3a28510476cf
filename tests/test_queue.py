"""The generation queue (`rewire_jax.generate_queue`): a fixed batch kept full by refilling rows.

Every sequence must get exactly what it gets alone (greedy tokens, deltas within 1e-5, the same
phase schedule at its own context lengths), whatever its neighbours, its row, or when it was
refilled; and refills must not recompile.
"""
import numpy as np
import pytest

import hf_models
import rewire_jax
from rewire_jax import RewireOptions
from rewire_jax.bench.perf import count_compiles
from rewire_jax.generation import DecodeChunks

PROMPT_LENS = [7, 13, 4, 10, 5, 16, 9, 3]
BUDGETS = [12, 6, 10, 12, 3, 9, 12, 7]
OPTS = RewireOptions(interval=4, selection="hard")


def _prompts(lens, seed0=1):
    return [hf_models.prompt(n, seed=s) for n, s in zip(lens, range(seed0, seed0 + len(lens)))]


@pytest.fixture(scope="module")
def setup(loaded):
    _, model = loaded("olmoe")
    prompts = _prompts(PROMPT_LENS)
    free = rewire_jax.generate(model, [prompts[0]], 12, rewire=OPTS, eos_token_id=None).tokens[0]
    eos = free[5]    # sequence 0 (at least) stops early at this "EOS"
    alone = [rewire_jax.generate(model, [p], b, rewire=OPTS, eos_token_id=eos) for p, b in zip(prompts, BUDGETS)]
    return model, prompts, eos, alone


def _same(alone, tokens, deltas, phases=None):
    assert tokens == alone.tokens[0]
    assert np.abs(np.asarray(deltas) - alone.deltas[0]).max() <= 1e-5
    if phases is not None:
        assert [p["context_len"] for p in phases] == [int(p.context_len[0]) for p in alone.phases]
        for p, a in zip(phases, alone.phases):
            assert p["loss_before"] == pytest.approx(float(a.loss_before[0]), abs=1e-5)


def test_queue_rows_equal_alone(setup):
    """8 mixed-length prompts, mixed budgets, some ending at EOS, through 3 rows (5 refills)."""
    model, prompts, eos, alone = setup
    q = rewire_jax.generate_queue(model, prompts, BUDGETS, batch_size=3, rewire=OPTS, eos_token_id=eos)
    assert q.stats["refills"] == len(prompts)
    assert any(len(a.tokens[0]) < b for a, b in zip(alone, BUDGETS)), "some sequence must stop early (EOS)"
    for i, a in enumerate(alone):
        _same(a, q.tokens[i], q.deltas[i], q.phases[i])


def test_queue_refilled_at_masked_chunk_boundaries_equals_alone(setup):
    """Masked decode chunks (the GPU/TPU loop): ended rows wait for the chunk's end and are
    refilled there; every sequence still gets what it gets alone (tokens, deltas, phases)."""
    from rewire_jax.generation import DecodeChunks
    model, prompts, eos, alone = setup
    q = rewire_jax.generate_queue(model, prompts, BUDGETS, batch_size=3, rewire=OPTS, eos_token_id=eos,
                                  chunks=DecodeChunks(3))
    assert q.stats["refills"] == len(prompts)
    for i, a in enumerate(alone):
        _same(a, q.tokens[i], q.deltas[i], q.phases[i])


def test_lockstep_batch_equals_alone(setup):
    """The same 8 prompts as one lock-step `generate` batch (one budget; EOS ends some early)."""
    model, prompts, eos, alone = setup
    batched = rewire_jax.generate(model, prompts, 12, rewire=OPTS, eos_token_id=eos)
    stopped = 0
    for i, p in enumerate(prompts):
        # the setup's run of this prompt alone is this very call when its budget was 12 too
        a = alone[i] if BUDGETS[i] == 12 else rewire_jax.generate(model, [p], 12, rewire=OPTS, eos_token_id=eos)
        stopped += len(a.tokens[0]) < 12
        _same(a, batched.tokens[i], batched.deltas[i])
    assert stopped >= 1


def test_queue_baseline_and_batch_of_one(setup):
    model, prompts, eos, _ = setup
    q = rewire_jax.generate_queue(model, prompts, BUDGETS, batch_size=4, eos_token_id=eos)
    one = rewire_jax.generate_queue(model, prompts[:3], BUDGETS[:3], batch_size=1, eos_token_id=eos)
    for i, p in enumerate(prompts):
        a = rewire_jax.generate(model, [p], BUDGETS[i], eos_token_id=eos)
        assert q.tokens[i] == a.tokens[0]
        assert q.phases[i] == []
        if i < 3:
            assert one.tokens[i] == a.tokens[0]
    # lock-step rows idle while the longest row of their batch runs on; the queue refills them
    assert 0 <= q.stats["idle_fraction"] < 1


@pytest.mark.parametrize("chunks", [None, 2])
def test_queue_stop_strings_end_a_row(loaded, chunks):
    """A row ends at the token completing its stop string (text cut before it), and its row is
    refilled; the other rows are unaffected."""
    _, model = loaded("olmoe")
    tok = _char_tokenizer(model)
    model = rewire_jax.api.Model(model.config, model.params, tok, model.path)
    prompts = _prompts([6, 9, 5])
    free = [rewire_jax.generate(model, [p], 10, eos_token_id=None).tokens[0] for p in prompts]
    stop_tok = free[1][3]
    stop = tok.decode([stop_tok])
    q = rewire_jax.generate_queue(model, prompts, 10, batch_size=2, eos_token_id=None,
                                  stops=[[], [stop], []], chunks=chunks and DecodeChunks(chunks))
    cut = free[1].index(stop_tok) + 1
    assert q.tokens[1] == free[1][:cut] and q.stopped[1]
    assert q.texts[1] == tok.decode(free[1][:cut - 1])
    assert q.tokens[0] == free[0] and q.tokens[2] == free[2]


def test_refills_do_not_recompile(loaded):
    """Compiled programs are bounded by the length buckets, not by refills: a cold run compiles at
    most one phase and one prefill per (context bucket, power-of-two sub-batch) plus one decode per
    window bucket; a second run with 16 new prompts (same lengths, 16 refills) compiles nothing."""
    _, model = loaded("olmoe")
    opts = RewireOptions(interval=4)
    lens = [6, 13, 9, 5, 12, 10, 7, 14, 8, 11, 6, 9, 13, 5, 10, 12]
    budgets = [8, 3, 5, 8, 6, 4, 8, 7, 8, 5, 8, 6, 2, 8, 4, 8]
    run = lambda seed: rewire_jax.generate_queue(model, _prompts(lens, seed), budgets, batch_size=4, rewire=opts,
                                                 eos_token_id=None)
    with count_compiles() as cold:
        q = run(40)
    big = lambda names: [c for c in names if any(n in c for n in ("prefill", "decode", "_steps_impl"))]
    # contexts 5..22: buckets 16, 32; sub-batches of 1, 2, 3, 4 rows; decode windows 16, 32
    assert len(big(cold)) <= 2 * 4 * 2 + 2, cold
    assert q.stats["refills"] == 16 and q.stats["decode_calls"] >= 8 and q.stats["phase_calls"] >= 8
    with count_compiles() as warm:
        run(80)
    assert big(warm) == [] and len(warm) <= 2, warm


class _CharTok:
    """A tokenizer stand-in: token t decodes to one character (enough for stop strings)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + int(t)) for t in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 0x4E00 for c in text]}


def _char_tokenizer(model):
    return _CharTok()
