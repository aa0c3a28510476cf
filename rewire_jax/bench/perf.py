"""Performance measurement utilities: XLA compile counting, FLOP counts of the rewiring phase, and
matmul peaks measured on the current device (used by `rewire_jax.bench` and the tests)."""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np


def scratch_dir(prefix: str) -> str:
    """A temporary directory (a benchmark's saved random-weight model, ~0.5 GB), removed when the
    process exits, also after an error (each run used to leave its model in /tmp)."""
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


# -- compile counting (also used by the tests) ---------------------------------------------------

@contextlib.contextmanager
def count_compiles():
    """Yield a list that collects the name of every XLA backend compilation inside the block."""
    import jax
    from jax._src import dispatch as _dispatch  # the event name only
    names: list[str] = []

    def listener(event, duration, **kw):
        if event == _dispatch.BACKEND_COMPILE_EVENT:
            names.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# -- FLOP counting and measured peaks -------------------------------------------------------------

def layer_flops(cfg, T: int) -> tuple[float, float]:
    """(forward, backward w.r.t. activations) useful FLOPs of one decoder layer over T tokens
    (causal attention counted as computed by a causal kernel: T(T+1)/2 query-key pairs)."""
    d, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = 2 * d * (H * Dh + 2 * K * Dh) + 2 * H * Dh * d
    moe = 2 * d * cfg.num_experts + 2 * 3 * d * cfg.moe_intermediate_size * cfg.num_experts_per_tok
    core = 2 * 2 * H * Dh * T * (T + 1) / 2
    return T * (proj + moe) + core, T * (proj + moe) + 2 * core


def head_flops(cfg, T: int) -> float:
    return 2.0 * T * cfg.hidden_size * cfg.vocab_size


def phase_flops(cfg, T: int, steps: int, lowest: int, split: Optional[int] = None) -> float:
    """Useful FLOPs of one phase on T tokens whose lowest updated decoder layer is `lowest`.

    split None: every step runs the full forward (plain); else layers < split run once and the
    steps start at `split`. The backward always runs only through the layers above `lowest` (the
    lowest updated layer itself needs no input gradient) plus the LM head.
    """
    f = [layer_flops(cfg, T)[0] for _ in range(cfg.num_layers)]
    b = [layer_flops(cfg, T)[1] for _ in range(cfg.num_layers)]
    bwd = sum(b[lowest + 1:]) + head_flops(cfg, T)
    if split is None:
        return steps * (sum(f) + head_flops(cfg, T) + bwd)
    return sum(f[:split]) + steps * (sum(f[split:]) + head_flops(cfg, T) + bwd)


def matmul_peak(repeats: int = 5, dtype: str = "float32", sizes=(1024, 2048, 4096)) -> float:
    """Best GFLOP/s of square matmuls (n = each of `sizes`) under jax.jit on the default device."""
    import jax
    import jax.numpy as jnp
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        t = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def shape_ceiling(cfg, T: int, dtype: str = "float32", repeats: int = 3) -> dict:
    """GFLOP/s of the matmuls one phase step is made of, at their own shapes (a loop of each on
    cache-resident operands, as in the phase), and their FLOP-weighted ceiling: the rate the phase
    would reach if it were nothing but these matmuls. Small matmuls (the experts' 32-row blocks) run
    well below the big-square peak, so this is the honest roofline for a given model size."""
    import jax
    import jax.numpy as jnp
    from rewire_jax.model import dispatch as moe
    d, H, K, Dh, I, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.moe_intermediate_size, cfg.vocab_size)
    block = moe.choose_block(T * cfg.num_experts_per_tok, cfg.num_experts)
    # (name, batch, M, K, N, FLOPs of this shape per forward over T tokens, all layers)
    L = cfg.num_layers
    rows = T * cfg.num_experts_per_tok
    shapes = [("q/o projections", 1, T, d, H * Dh, L * 2 * 2 * T * d * H * Dh),
              ("k/v projections", 1, T, d, K * Dh, L * 2 * 2 * T * d * K * Dh),
              ("expert gate/up blocks", 1, block, d, I, L * 2 * 2 * rows * d * I),
              ("expert down blocks", 1, block, I, d, L * 2 * rows * I * d),
              ("attention scores", H, 128, Dh, T, L * 2 * 2 * H * Dh * T * (T + 1) / 2),
              ("LM head", 1, T, d, V, 2 * T * d * V)]
    out, total_t, total_f = {}, 0.0, 0.0
    for name, b, m, k, n, flops in shapes:
        a = jax.random.normal(jax.random.key(0), (b, m, k), dtype)
        w = jax.random.normal(jax.random.key(1), (b, k, n), dtype)
        reps = max(1, int(2e9 / (2 * b * m * k * n)))
        f = jax.jit(lambda a, w: jax.lax.fori_loop(
            0, reps, lambda i, c: c + jnp.einsum("bmk,bkn->bmn", a + i.astype(a.dtype), w).astype(c.dtype),
            jnp.zeros((b, m, n), jnp.float32)))
        f(a, w).block_until_ready()
        t = min(_timed(lambda: f(a, w).block_until_ready()) for _ in range(repeats))
        rate = 2 * b * m * k * n * reps / t / 1e9
        out[f"{name} [{b}x{m}x{k}]x[{k}x{n}]"] = rate
        total_t += flops / rate
        total_f += flops
    out["weighted"] = total_f / total_t
    return out


def copy_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of device memory traffic: a jitted elementwise `x + 1` over an `mb` MiB int32 array,
    in place (the input is donated: a fresh output buffer per call cost page faults on CPU, 0.6 against
    28 GB/s measured), reading and writing it (2 * nbytes moved), best of `repeats`."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = f(jnp.zeros((mb << 18,), jnp.int32))
    x.block_until_ready()
    nbytes, best = x.nbytes, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def numpy_peak(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return 2 * n ** 3 / min(_timed(lambda: a @ a) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
