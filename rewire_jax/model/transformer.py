"""The decoder-only MoE transformer as pure functions of (params, config).

Params are the plain nested dict declared in `weights.py`. Runs of identical decoder layers (a
`Stack` of `layer_plan`) execute as one `lax.scan` over their stacked weights, so the traced and
compiled program does not grow with depth. The router deltas are an explicit input,
`deltas [B, L_moe, E]`: row r belongs to decoder layer `cfg.moe_layers[r]` and is added to that
layer's router logits (`moe.moe_block`, the only place a delta enters). An optional routing
override `route` (`moe.RouteOverride`: target [B, L_moe, E], alpha [B, L_moe], start [B]; C3PO)
rides along the deltas the same way (row r to decoder layer `cfg.moe_layers[r]`, scanned or
unrolled); route=None is today's program, unchanged.

KV cache: a tree shaped like the stacks, `cache[stack][sub][name]` = [repeats, B, S, ...] (GQA:
'k', 'v' [.., K, D]; MLA: 'latent' [.., R], 'k_pe' [.., Dr]); token t of sequence b lives in row
t of every layer (right padding).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import layers as L
from .attention import attention
from .config import ModelConfig
from .moe import EXPERT_WEIGHTS, RouteOverride, dense_mlp, moe_block
from .sharding import constrain_batch
from .weights import Stack, layer_plan

#: Stacks of at most this many repeats run unrolled by default (see `scan_stack`).
UNROLL_MAX = 8


def positions_for(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def embed(params, tokens, cfg: ModelConfig):
    """tokens [B, T] int -> x [B, T, d]."""
    with jax.named_scope("embed"):
        return jnp.take(params["embed"].astype(cfg.jnp_dtype), tokens, axis=0)


def head(params, x, cfg: ModelConfig):
    """Final norm + LM head: x [B, T, d] -> fp32 logits [B, T, V]."""
    with jax.named_scope("lm_head"):
        x = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
        w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
        return jnp.dot(x, w.astype(x.dtype)).astype(jnp.float32)


def decoder_layer(p, x, positions, delta, cfg: ModelConfig, layer: int, cache=None, kv_valid=None,
                  dispatch: Optional[str] = None, expert_layer=None, route=None):
    """One pre-norm decoder layer. p: that layer's weights (unstacked, except the routed experts'
    when expert_layer indexes their stack); delta [B, E] or None; cache: this layer's cache entry
    or None; route: None or this layer's routing override (target [B, E], alpha [B], start [B]).
    -> (x [B, T, d], new cache rows, aux or None). `layer` is only read for what is static (MoE or
    dense, the attention window)."""
    with jax.named_scope("attention"):
        h, rows = attention(p["attn"], L.rms_norm(x, p["input_norm"], cfg.rms_norm_eps), positions, cfg,
                            cfg.window(layer), cache, kv_valid)
    h = x + h
    y = L.rms_norm(h, p["post_norm"], cfg.rms_norm_eps)
    if cfg.is_moe(layer):
        with jax.named_scope("moe"):
            override = None
            if route is not None:   # the override acts from position start[b] on
                target, alpha, start = route
                override = (target, alpha, positions >= start[:, None])
            y, aux = moe_block(p["mlp"], y, delta, cfg, dispatch, expert_layer, override)
    else:
        with jax.named_scope("mlp"):
            y, aux = dense_mlp(p["mlp"], y), None
    return h + y, rows, aux


#: remat='auto' rematerialises every layer from B*T tokens on (the optimise phase's activations
#: then grow linearly in the context; below it the extra forward costs more than it saves).
REMAT_AUTO_TOKENS = 2048


def use_remat(cfg: ModelConfig, n_tokens: int) -> bool:
    """Whether decoder layers run under `jax.checkpoint` (only matters under autodiff: the
    optimise phase). cfg.remat: 'layer' always, 'none' never, 'auto' from REMAT_AUTO_TOKENS tokens."""
    if cfg.remat == "auto":
        return n_tokens >= REMAT_AUTO_TOKENS
    return cfg.remat == "layer"


def _remat_layer(p, x, positions, delta, kv_valid, expert_layer, cfg, layer, dispatch, route=None):
    """decoder_layer, rematerialised: the backward keeps only the layer's inputs and recomputes the
    layer when its output cotangent arrives (same values: same ops). A custom VJP rather than
    jax.checkpoint: the recomputation takes the cotangent through an optimization_barrier, so XLA
    cannot hoist every layer's recomputation to the start of the backward (which it did with
    jax.checkpoint on unrolled layers: more memory than no remat at all)."""
    inner = cfg.replace(remat="layer")   # attention inside keeps no probabilities either (layers.attend lean)

    def f(p, x, delta, positions, kv_valid, expert_layer, route):
        return decoder_layer(p, x, positions, delta, inner, layer, None, kv_valid, dispatch, expert_layer, route)

    @jax.custom_vjp
    def run(p, x, delta, rest):
        return f(p, x, delta, *rest)

    def run_fwd(p, x, delta, rest):
        return f(p, x, delta, *rest), (p, x, delta, rest)

    def run_bwd(res, ct):
        (p, x, delta, rest), ct = jax.lax.optimization_barrier((res, ct))
        _, pull = jax.vjp(lambda p, x, delta: f(p, x, delta, *rest), p, x, delta)
        return (*pull(ct), jax.tree.map(_zero_cotangent, rest))

    run.defvjp(run_fwd, run_bwd)
    return run(p, x, delta, (positions, kv_valid, expert_layer, route))


def _zero_cotangent(a):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def write_rows(stacked, rows, rep, start):
    """stacked [R, B, S, ...]; rows [B, T, ...]; rep [] int; start [B] -> stacked with row block
    [rep, b, start[b]:start[b]+T] = rows[b] (a scatter: in place inside loops)."""
    B, T = rows.shape[:2]
    pos = start[:, None] + jnp.arange(T)[None]                                     # [B, T]
    return stacked.at[rep, jnp.arange(B)[:, None], pos].set(rows.astype(stacked.dtype), unique_indices=True,
                                                              indices_are_sorted=True, mode="promise_in_bounds")


def scan_stack(cfg: ModelConfig, st: Stack) -> bool:
    """Whether a stack runs as a lax.scan (compile time independent of depth) or unrolled.

    `cfg.scan_layers` True / False decides; None (default): scan stacks of more than UNROLL_MAX
    repeats. A scan slices its layer's weights (and KV cache) out of the stack at every step: on the
    benchmark's 8-layer model that made decode 2x slower on CPU (XLA:CPU copies each slice before a
    matmul) and the optimise phase 1.65x slower on an H200 (measured, scripts/scan_speed.py); below
    a few layers unrolling costs little compile time, above it the scan's flat compile time wins."""
    if st.repeats == 1:
        return False
    if cfg.scan_layers is not None:
        return cfg.scan_layers
    return st.repeats > UNROLL_MAX


def _split(tree, repeats: int):
    """Stacked leaves [R, ...] -> a tuple of R trees of separate (materialised) per-layer arrays."""
    return tuple(jax.tree.map(lambda a: a[r], tree) for r in range(repeats))


def split_layers(params, cfg: ModelConfig):
    """params with every unrolled stack's sub-layers as a tuple of per-layer trees (one copy each,
    made once, e.g. before a decode loop), scanned stacks as they are. Idempotent."""
    stacks = {}
    for s, st in enumerate(layer_plan(cfg)):
        subs = params["stacks"][str(s)]
        stacks[str(s)] = subs if scan_stack(cfg, st) else {
            j: t if isinstance(t, tuple) else _split(t, st.repeats) for j, t in subs.items()}
    return {**params, "stacks": stacks}


@functools.partial(jax.jit, static_argnames=("cfg",))
def prepare_params(params, cfg: ModelConfig):
    """`split_layers` once, as its own compiled call: the per-layer copies become separate device
    buffers that every later call (prefill, the phases, decode) takes as they are. What `generate`
    does before its cycle; a no-op for scanned stacks."""
    return split_layers(params, cfg)


def split_cache(cache, cfg: ModelConfig):
    """The cache with each unrolled stack's buffers as per-layer 2-D buffers [B * S, features] (see
    split_layers; `write_layer_cache` writes them). 2-D because a decode step reads the buffer it
    has just written: with a [1, S, K, D] buffer XLA drops the unit batch dimension for the
    attention matmul (a bitcast), duplicates the row write into that bitcast and copies the whole
    buffer for each copy of the write, four copies of every layer's K and V per token (measured: a
    third of a batch-1 decode step). [B * S, K * D] is what the matmul reads, so nothing is copied."""
    flat = lambda a: a.reshape(a.shape[0] * a.shape[1], -1)
    return {str(s): cache[str(s)] if scan_stack(cfg, st) else
            {j: jax.tree.map(flat, _split(c, st.repeats)) for j, c in cache[str(s)].items()}
            for s, st in enumerate(layer_plan(cfg))}


def join_cache(cache, like):
    """Inverse of split_cache: per-layer buffers stacked again, in the shapes of `like` (the cache
    that was split: [R, B, S, ...] leaves)."""
    def join(c, ref):
        if not isinstance(c, tuple):
            return c
        return jax.tree.map(lambda r, *a: jnp.stack(a).reshape(r.shape), ref, *c)
    return {s: {j: join(c, like[s][j]) for j, c in subs.items()} for s, subs in cache.items()}


def write_layer_cache(buf, rows, start):
    """buf [B * S, F] (one layer's buffer, `split_cache`); rows [B, T, ...] with prod(...) = F;
    start [B] -> buf with sequence b's rows at start[b]: (clamped to [0, S - T], as
    dynamic_update_slice does). In place inside a decode loop."""
    B, T = rows.shape[:2]
    S = buf.shape[0] // B
    new = rows.reshape(B * T, -1).astype(buf.dtype)
    start = jnp.clip(start, 0, S - T)
    at = ((jnp.arange(B) * S + start)[:, None] + jnp.arange(T)[None]).reshape(-1)
    return buf.at[at].set(new, unique_indices=True, indices_are_sorted=True, mode="promise_in_bounds")


def _index(tree, rep):
    if isinstance(rep, int):   # materialise the slice: XLA:CPU fuses a static slice into a slow matmul
        return jax.lax.optimization_barrier(jax.tree.map(lambda a: a[rep], tree))
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, rep, keepdims=False), tree)


def _layer_weights(p, rep, moe: bool):
    """One repeat's weights of a stacked sub-layer; the routed experts stay stacked (the dispatch
    slices just the experts it uses: slicing the layer here would copy all of them)."""
    if not moe:
        return _index(p, rep)
    stacked = {n: a for n, a in p["mlp"].items() if n in EXPERT_WEIGHTS}
    out = _index({**p, "mlp": {n: a for n, a in p["mlp"].items() if n not in EXPERT_WEIGHTS}}, rep)
    out["mlp"].update(stacked)
    return out


def _delta_rows(cfg: ModelConfig, st, sub: int):
    """Delta row of sub-layer `sub` at every repeat of stack `st` ([R] int32), or None if dense."""
    if not cfg.is_moe(st.layer(0, sub)):
        return None
    return np.asarray([cfg.moe_index(st.layer(r, sub)) for r in range(st.repeats)], np.int32)


def _run_reps(params_s, cache_s, st, reps: range, subs: range, x, positions, deltas, cfg, kv_valid, dispatch,
              collect_rows: bool, route=None):
    """Run sub-layers `subs` of repeats `reps` of one stack; a scan over the repeats when more
    than one. -> (x, cache_s, rows {sub: [n_reps, ...]} or None, aux {sub: [n_reps, ...]})."""
    delta_rows = {j: _delta_rows(cfg, st, j) for j in subs}
    if (cache_s is None and len(reps) > 1 and use_remat(cfg, x.shape[0] * x.shape[1])
            and any(isinstance(params_s[str(j)], tuple) for j in subs)):
        # remat needs the scan: on unrolled layers XLA schedules the recomputations together and the
        # backward kept as much as without remat (measured); a scan recomputes one layer per step.
        # (Restacking copies this stack's weights: only stacks of <= UNROLL_MAX repeats are unrolled.)
        params_s = {**params_s, **{str(j): jax.tree.map(lambda *a: jnp.stack(a), *params_s[str(j)])
                                   for j in subs if isinstance(params_s[str(j)], tuple)}}

    def body(carry, rep):
        x, cache_s = carry
        rows_out, aux_out = {}, {}
        for j in subs:
            split = isinstance(params_s[str(j)], tuple)     # unrolled: rep is a Python int
            with jax.named_scope(f"layer{j}" if st.unit > 1 else "layer"):
                moe = delta_rows[j] is not None
                p = params_s[str(j)][rep] if split else _layer_weights(params_s[str(j)], rep, moe)
                delta = layer_route = None
                if moe:
                    row = jnp.asarray(delta_rows[j])[rep]
                    delta = jax.lax.dynamic_index_in_dim(deltas, row, 1, keepdims=False)
                    if route is not None:   # this layer's row of the override, like its delta
                        layer_route = (jax.lax.dynamic_index_in_dim(route.target, row, 1, keepdims=False),
                                       jax.lax.dynamic_index_in_dim(route.alpha, row, 1, keepdims=False),
                                       route.start)
                c = None
                if cache_s is not None:
                    def c(rows, j=str(j)):   # write the rows into the cache in place, then read the layer
                        nonlocal cache_s
                        if isinstance(cache_s[j], tuple):   # per-layer 2-D buffers (split_cache)
                            layer = {n: write_layer_cache(cache_s[j][rep][n], rows[n], positions[:, 0])
                                     for n in rows}
                            cache_s = {**cache_s, j: cache_s[j][:rep] + (layer,) + cache_s[j][rep + 1:]}
                            return {n: layer[n].reshape((rows[n].shape[0], -1) + rows[n].shape[2:]) for n in rows}
                        cache_s = {**cache_s, j: {n: write_rows(cache_s[j][n], rows[n], rep, positions[:, 0])
                                                  for n in rows}}
                        return _index(cache_s[j], rep)
                el = None if split or not moe else rep
                if c is None and use_remat(cfg, x.shape[0] * x.shape[1]):
                    x, rows, aux = _remat_layer(p, x, positions, delta, kv_valid, el, cfg, st.layer(0, j), dispatch,
                                                layer_route)
                else:
                    x, rows, aux = decoder_layer(p, x, positions, delta, cfg, st.layer(0, j), c, kv_valid, dispatch, el,
                                                 layer_route)
            if collect_rows:
                rows_out[j] = rows
            if aux is not None:
                aux_out[j] = aux
        return (x, cache_s), (rows_out, aux_out)

    if len(reps) == 1 or any(isinstance(params_s[str(j)], tuple) for j in subs):
        ys = []
        for rep in reps:
            (x, cache_s), y = body((x, cache_s), rep)
            ys.append(y)
        rows, aux = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else ({}, {})
        return x, cache_s, rows, aux
    (x, cache_s), (rows, aux) = jax.lax.scan(body, (x, cache_s), jnp.arange(reps.start, reps.stop))
    return x, cache_s, rows, aux


def run_layers(params, x, positions, deltas, cfg: ModelConfig, start: int = 0, stop: Optional[int] = None,
               cache=None, kv_valid=None, dispatch: Optional[str] = None, route: Optional[RouteOverride] = None):
    """Decoder layers [start, stop) (static). x [B, T, d]; deltas [B, L_moe, E]; route: None or a
    `RouteOverride` with [B, ...] arrays (see moe.RouteOverride).

    -> (x, cache, aux): with `cache` given (decode), the cache with this chunk's rows written in;
    without, the chunk's rows as a cache tree ([repeats, B, T, ...] leaves) when every layer ran
    (prefill), else None; aux stacked over the MoE layers run along axis 1 ({} if none).
    """
    stop = cfg.num_layers if stop is None else stop
    full = start == 0 and stop == cfg.num_layers
    params = split_layers(params, cfg)
    if cfg.mesh is not None:   # every sequence's activations, deltas (and so Adam state, cache rows) on the batch axes
        x, deltas = constrain_batch(x, cfg.mesh), constrain_batch(deltas, cfg.mesh)
        if route is not None:
            route = RouteOverride(*(constrain_batch(a, cfg.mesh) for a in route))
    new_cache, blocks = {}, []   # blocks: aux of the MoE layers run, [layers, B, ...] each, in layer order
    for s, st in enumerate(layer_plan(cfg)):
        lo, hi = max(start, st.first), min(stop, st.stop)
        if lo >= hi:
            continue
        cache_s = None if cache is None else cache[str(s)]
        parts = []   # (reps, subs): a partial unit before/after the whole repeats
        first_rep, first_sub = divmod(lo - st.first, st.unit)
        last_rep, last_sub = divmod(hi - st.first, st.unit)
        if first_sub:
            end = st.unit if last_rep > first_rep else last_sub
            parts.append((range(first_rep, first_rep + 1), range(first_sub, end)))
            first_rep += 1
        if last_rep > first_rep:
            parts.append((range(first_rep, last_rep), range(st.unit)))
        if last_sub and last_rep >= first_rep:
            parts.append((range(last_rep, last_rep + 1), range(0, last_sub)))
        for reps, subs in parts:
            x, cache_s, rows, aux = _run_reps(params["stacks"][str(s)], cache_s, st, reps, subs, x, positions,
                                              deltas, cfg, kv_valid, dispatch, collect_rows=full and cache is None,
                                              route=route)
            moe_subs = [j for j in subs if j in aux]
            if moe_subs:   # [n_reps, n_moe_subs, ...] -> [n_reps * n_moe_subs, ...]: layer order
                blocks.append(jax.tree.map(lambda *a: jnp.stack(a, 1).reshape((-1,) + a[0].shape[1:]),
                                           *[aux[j] for j in moe_subs]))
            if full and cache is None:
                new_cache[str(s)] = {str(j): rows[j] for j in subs}
        if cache is not None:
            new_cache[str(s)] = cache_s
    aux = jax.tree.map(lambda *a: jnp.moveaxis(jnp.concatenate(a, 0), 0, 1), *blocks) if blocks else {}
    if cache is not None:
        new_cache = {**cache, **new_cache}
    elif not full:
        new_cache = None
    return x, new_cache, aux


def forward(params, tokens, deltas, cfg: ModelConfig, positions=None, kv_valid=None,
            dispatch: Optional[str] = None, route: Optional[RouteOverride] = None):
    """Full (teacher-forced) forward, no cache. tokens [B, T] -> (logits [B, T, V] fp32, aux).
    positions [B, T] (default 0..T-1) must be strictly increasing integers along T. route: None or
    a `RouteOverride` ([B, ...] arrays). aux: {'logits' [B, L_moe, T, E] router logits (+ delta),
    'idx' [B, L_moe, T, k] the experts used, 'score' [B, L_moe, T]}."""
    positions = positions_for(tokens) if positions is None else positions
    x, _, aux = run_layers(params, embed(params, tokens, cfg), positions, deltas, cfg, kv_valid=kv_valid,
                           dispatch=dispatch, route=route)
    return head(params, x, cfg), aux


def zero_deltas(cfg: ModelConfig, batch: Optional[int] = None):
    """Deltas that change nothing: zeros [L_moe, E] (or [batch, L_moe, E]) float32, one row per MoE
    layer (`cfg.moe_layers`), one column per routed expert."""
    shape = cfg.delta_shape if batch is None else (batch, *cfg.delta_shape)
    return jnp.zeros(shape, jnp.float32)


def batched_deltas(deltas, batch: int, cfg: ModelConfig):
    """None | [L_moe, E] | [B, L_moe, E] -> [B, L_moe, E] fp32, with a clear error otherwise."""
    if deltas is None:
        return zero_deltas(cfg, batch)
    deltas = jnp.asarray(deltas, jnp.float32)
    if deltas.shape == cfg.delta_shape:
        return jnp.broadcast_to(deltas, (batch, *cfg.delta_shape))
    if deltas.shape != (batch, *cfg.delta_shape):
        raise ValueError(
            f"deltas have shape {deltas.shape}; expected {cfg.delta_shape} (L_moe, E) or "
            f"{(batch, *cfg.delta_shape)} (B, L_moe, E) for this model and batch")
    return deltas


def batched_route(route, batch: int, cfg: ModelConfig) -> Optional[RouteOverride]:
    """None | RouteOverride with unbatched ([L_moe, E], [L_moe], []) or batched ([B, L_moe, E],
    [B, L_moe], [B]) arrays -> None | RouteOverride with [B, ...] arrays (fp32, fp32, int32)."""
    if route is None:
        return None
    target, alpha, start = (jnp.asarray(a) for a in route)
    if target.shape == cfg.delta_shape:
        target, alpha, start = (jnp.broadcast_to(a, (batch, *a.shape)) for a in (target, alpha, start))
    want = ((batch, *cfg.delta_shape), (batch, cfg.num_moe_layers), (batch,))
    got = (target.shape, alpha.shape, start.shape)
    if got != want:
        raise ValueError(f"route override arrays have shapes {got}; expected {want} (target, alpha, start) "
                         f"for this model and batch, or the same without the batch axis")
    return RouteOverride(target.astype(jnp.float32), alpha.astype(jnp.float32), start.astype(jnp.int32))
