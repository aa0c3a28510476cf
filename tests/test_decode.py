"""KV-cache decode vs a full teacher-forced forward, vs HF generate, batched vs alone."""
import numpy as np
import pytest
import torch

import hf_models
import rewire_jax
from rewire_jax import Sampling


@pytest.mark.parametrize("name", ["olmoe", "olmoe_gqa_clip_norm"])
def test_decode_equals_teacher_forced_argmax(loaded, name):
    _, model = loaded(name)
    prompt = hf_models.prompt(9)
    delta = np.random.default_rng(3).normal(0, 1, model.config.delta_shape).astype(np.float32)
    for d in (None, delta):
        out = rewire_jax.generate(model, [prompt], 14, deltas=d, eos_token_id=None)
        assert out.tokens[0] == hf_models.teacher_forced_rollout(model, prompt, 14, d)[0]


def test_greedy_equals_hf_generate(loaded):
    tm, model = loaded("olmoe")
    prompt = hf_models.prompt(10)
    with torch.no_grad():
        ref = tm.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
    assert rewire_jax.generate(model, [prompt], 16, eos_token_id=None).tokens[0] == ref


def test_batched_prompts_of_different_lengths_equal_alone(loaded):
    _, model = loaded("olmoe_gqa_clip_norm")
    prompts = [hf_models.prompt(5, seed=1), hf_models.prompt(11, seed=2), hf_models.prompt(2, seed=3)]
    batched = rewire_jax.generate(model, prompts, 10, eos_token_id=None)
    for p, toks in zip(prompts, batched.tokens):
        assert toks == rewire_jax.generate(model, [p], 10, eos_token_id=None).tokens[0]


def test_eos_stops_each_sequence(loaded):
    _, model = loaded("olmoe")
    prompt = hf_models.prompt(8)
    free = rewire_jax.generate(model, [prompt], 12, eos_token_id=None).tokens[0]
    eos = free[4]  # pretend the 5th generated token is EOS
    out = rewire_jax.generate(model, [prompt, hf_models.prompt(6, seed=9)], 12, eos_token_id=eos)
    first = free.index(eos)
    assert out.tokens[0] == free[:first + 1]
    assert all(t != eos for t in out.tokens[1][:-1])


def test_sampling_is_seeded_and_filtered(loaded):
    _, model = loaded("olmoe")
    prompt = hf_models.prompt(6)
    s = Sampling(temperature=1.0, top_k=5, top_p=0.9)
    a = rewire_jax.generate(model, [prompt], 12, sampling=s, seed=3, eos_token_id=None).tokens[0]
    b = rewire_jax.generate(model, [prompt], 12, sampling=s, seed=3, eos_token_id=None).tokens[0]
    c = rewire_jax.generate(model, [prompt], 12, sampling=s, seed=4, eos_token_id=None).tokens[0]
    assert a == b and a != c
    greedy = rewire_jax.generate(model, [prompt], 12, eos_token_id=None).tokens[0]
    top1 = rewire_jax.generate(model, [prompt], 12, sampling=Sampling(1.0, top_k=1), seed=5, eos_token_id=None)
    assert top1.tokens[0] == greedy
    tiny_p = rewire_jax.generate(model, [prompt], 12, sampling=Sampling(1.0, top_p=1e-6), seed=5, eos_token_id=None)
    assert tiny_p.tokens[0] == greedy


def test_sample_top_k_top_p_masks():
    import jax
    import jax.numpy as jnp
    from rewire_jax.decode import sample
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 300)
    draw = lambda s: set(np.asarray(jax.vmap(lambda k: sample(logits, k, s)[0])(keys)).tolist())
    assert draw(Sampling(1.0, top_p=0.75)) == {0, 1}   # 0.5 < 0.75 needs token 1 as well
    assert draw(Sampling(1.0, top_k=3)) == {0, 1, 2}
    assert draw(Sampling(1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("batch,masked", [(1, False), (3, False), (3, True)])
def test_decode_loop_writes_the_kv_cache_in_place(batch, masked):
    """The compiled decode loop copies no layer's KV buffer: each token's row is written in place.
    (With [1, S, K, D] buffers XLA copied every layer's K and V four times per decoded token at
    batch 1, a third of the step; the per-layer buffers are [B * S, K * D] for that reason.) Also
    checks that the 2-D buffers give the same tokens as a teacher-forced rollout. masked: the
    static-trip chunk loop (GPU/TPU) the same.)"""
    import re

    import jax
    import jax.numpy as jnp

    from rewire_jax.cli import DEMO_MODEL
    from rewire_jax.generation.decode import DecodeState, decode, prefill
    from rewire_jax.model.transformer import prepare_params

    model = rewire_jax.load(DEMO_MODEL)
    cfg = model.config
    S, T = 64, 12
    tokens = np.tile(np.arange(3, 3 + T, dtype=np.int32), (batch, 1))
    params = prepare_params(model.params, cfg)
    deltas = jnp.zeros((batch,) + cfg.delta_shape)
    logits, cache, _ = prefill(params, jnp.asarray(tokens), jnp.full(batch, T), deltas, cfg, S, None)
    buf = jnp.zeros((batch, S), jnp.int32).at[:, :T].set(tokens)
    state = DecodeState(buf, jnp.full(batch, T, jnp.int32), logits, jnp.zeros(batch, bool),
                        jnp.zeros(batch, jnp.int32), jax.random.key(0))
    args = (params, state, cache, deltas, jnp.zeros(0, jnp.int32), jnp.int32(8), cfg, Sampling(), 8)
    hlo = decode.lower(*args, masked=masked).compile().as_text()
    K, D = cfg.num_kv_heads, cfg.head_dim
    layer_shapes = {f"[{batch * S},{K * D}]", f"[{batch},{S},{K},{D}]", f"[{batch},{S},{K * D}]"}
    copied = [m.group(1) for m in re.finditer(r"= f32(\[[0-9,]+\])\{[0-9,]*\} copy\(", hlo)]
    assert not [c for c in copied if c in layer_shapes], copied
    state, _ = decode(*args, masked=masked)
    new = np.asarray(state.buf)[:, T:T + 8]
    assert new[0].tolist() == hf_models.teacher_forced_rollout(model, tokens[0].tolist(), 8)[0]
    assert (new == new[0]).all()


def test_decode_chunks_trip_counts_and_backend_defaults():
    from rewire_jax.generation import DecodeChunks, default_chunks
    assert default_chunks("gpu") == default_chunks("tpu") == DecodeChunks(32, masked=True)
    assert default_chunks("cpu") == DecodeChunks(128, masked=False)
    # steps per device call: at most `steps`, spread over the fewest chunks (static: one program)
    assert [DecodeChunks(32).trip(n) for n in (1, 8, 32, 33, 100, 128)] == [1, 8, 32, 17, 25, 32]
    with pytest.raises(ValueError, match="DecodeChunks.steps must be >= 1"):
        DecodeChunks(0)


def test_decode_chunks_give_the_same_tokens(loaded):
    """A decode cut into device calls (masked static-trip chunks as on GPU/TPU, or while_loop
    chunks) gives the tokens and key stream of one while_loop call (the loop before chunks): EOS in
    the middle of a chunk, a budget that is no multiple of the chunk, greedy and sampled."""
    from rewire_jax.generation import DecodeChunks
    _, model = loaded("olmoe")
    prompts = [hf_models.prompt(8), hf_models.prompt(6, seed=9), hf_models.prompt(3, seed=4)]
    free = rewire_jax.generate(model, prompts[:1], 13, eos_token_id=None).tokens[0]
    eos = free[4]
    for s in (Sampling(), Sampling(1.0, top_k=5)):
        gen = lambda ch: rewire_jax.generate(model, prompts, 13, sampling=s, seed=2, eos_token_id=eos, chunks=ch).tokens
        one = gen(DecodeChunks(13, masked=False))      # one device call of 13 steps
        if s == Sampling():
            assert one[0] == free[:free.index(eos) + 1]
        for ch in (DecodeChunks(4), DecodeChunks(5, masked=False), DecodeChunks(32)):
            assert gen(ch) == one, (s, ch)
