"""Audit the compiled optimise phase for weight-sized copies, per dispatch path (no run, no device).

  python scripts/phase_audit.py [--hidden 2048 --inter 1024 --experts 64 --top-k 8 --layers 2
                                 --vocab 50304 --context 256 --batch 1] [--dispatch ragged,kernel]
                                [--json OUT]

An OLMoE-shaped bf16 model (random weights, never run) is lowered and compiled for the default
backend; for each dispatch path it reports:
  program    converts to fp32 and transposes of arrays at least half a layer's expert matrix, in
             the program as JAX emits it (before XLA's passes: the same on every backend, except
             for `layers.einsum_f32`, which upcasts on CPU only by design);
  compiled   the materialised (non-fused) buffers of that size in the backend's optimised HLO, by
             shape, opcode and source op;
  temp       XLA's temp allocation for the phase (memory_analysis), next to the weights' bytes.
"""
from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from rewire_jax import config as config_lib
from rewire_jax import rewire as R
from rewire_jax.bench.memory import OLMOE_1B_7B
from rewire_jax.model import init_params
from rewire_jax.rewire.options import hyper_array, static_options

_SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call"}


def _n(dims: str, sep: str) -> int:
    return int(np.prod([int(x) for x in dims.split(sep)])) if dims else 1


def program_copies(text: str, min_elems: int) -> dict:
    """{'convert a->b' / 'transpose a->b': count} in StableHLO text, for results >= min_elems."""
    out = collections.Counter()
    for line in text.splitlines():
        g = re.search(r"stablehlo\.(convert|transpose)\b.*\(tensor<([\dx]+)x(\w+)>\) -> tensor<([\dx]+)x(\w+)>", line)
        if g and _n(g.group(4), "x") >= min_elems and (g.group(1) == "transpose" or g.group(5) == "f32"):
            out[f"{g.group(1)} {g.group(2)}x{g.group(3)} -> {g.group(4)}x{g.group(5)}"] += 1
    return dict(out)


def compiled_buffers(text: str, min_elems: int) -> dict:
    """{'dtype[dims] opcode (source op)': count}: instructions >= min_elems outside fusion bodies."""
    fused = set(re.findall(r"calls=%([\w.\-]+)", text))
    header = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
    instr = re.compile(r"^\s*(ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
    out, comp = collections.Counter(), None
    for line in text.splitlines():
        h = header.match(line)
        if h:
            comp = h.group(2)
            continue
        g = instr.match(line) if comp is not None and comp not in fused else None
        if g and g.group(4) not in _SKIP and _n(g.group(3), ",") >= min_elems:
            src = re.search(r'op_name="([^"]*)"', g.group(5))
            out[f"{g.group(2)}[{g.group(3)}] {g.group(4)} ({src.group(1).split('/')[-1] if src else '-'})"] += 1
    return dict(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 2048), ("inter", 1024), ("experts", 64), ("top-k", 8), ("layers", 2),
                          ("vocab", 50304), ("context", 256), ("batch", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dispatch", default="ragged,kernel")
    p.add_argument("--json")
    a = p.parse_args(argv)
    hf = {**OLMOE_1B_7B, "hidden_size": a.hidden, "intermediate_size": a.inter, "num_experts": a.experts,
          "num_experts_per_tok": a.top_k, "num_hidden_layers": a.layers, "vocab_size": a.vocab}
    cfg = config_lib.from_hf(hf, dtype="bfloat16")
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(0))
    opts = R.RewireOptions()
    B, T = a.batch, a.context
    deltas = jnp.zeros((B,) + cfg.delta_shape)
    args = (params, deltas, R.init_opt_state(opts, deltas), jnp.zeros((B, T), jnp.int32), jnp.full((B,), T),
            jnp.ones((B,), bool), np.zeros(cfg.num_moe_layers, bool), hyper_array(opts), None, None)
    min_elems = a.experts * a.hidden * a.inter // 2
    res = {"backend": jax.default_backend(), "shape": vars(a),
           "weights_mib": sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20, "paths": {}}
    print(f"backend {res['backend']}, weights {res['weights_mib']:.1f} MiB, context {T}, batch {B}")
    for method in a.dispatch.split(","):
        lowered = R._steps_jit.lower(*args, cfg=cfg, opts=static_options(opts), dispatch=method, split=0,
                                     steps=opts.steps)
        compiled = lowered.compile()
        r = {"program": program_copies(lowered.as_text(), min_elems),
             "compiled": compiled_buffers(compiled.as_text(), min_elems),
             "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
        res["paths"][method] = r
        print(f"== {method}: temp {r['temp_mib']:.1f} MiB")
        for kind in ("program", "compiled"):
            for k, c in sorted(r[kind].items()):
                print(f"   {kind:8s} {k} x{c}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
