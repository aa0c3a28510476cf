"""Op counts of the compiled decode step: dots, fusions and custom calls per decoder layer.

    python -m rewire_jax.bench.opcount [--config CONFIG_JSON] [--batch 1] [--cache-len 256] [--dispatch auto]

The program counted is the library's own decode loop (`generation.decode.decode`, one token per
step, on the weights `generate` passes it: `prepare_params`), lowered for abstract arguments and
compiled for the default backend; the counts come from its optimized HLO (`compiled.as_text()`).
One decode step is one iteration of the loop's `while` body: every instruction there counts once,
instructions inside a nested loop (a scanned layer stack, a loop over experts) count once per trip
of that loop (XLA's `known_trip_count`; 1 when unknown), every branch of a conditional counts.

- dots: `dot` / `convolution` instructions, also those inside fusions (the matmuls);
- fusions: fusion instructions (each one kernel);
- custom_calls: custom-call instructions (cuBLAS / cuDNN / Triton / Pallas kernels, TopK, ...);
- kernels: every top-level instruction that does work (fusions, custom calls, unfused dots, copies,
  scatters, ...; not parameters, tuples, bitcasts or control flow): the launches of a step on a GPU.

An instruction belongs to a decoder layer when its `op_name` metadata has a `layer` scope
(`model.stack` names every layer's trace `layer` / `layerN`); the rest (embedding, LM head, sampling,
loop bookkeeping) is `other`. Instructions XLA left without metadata (XLA:CPU's library fusions)
take their first operand's op_name that has one (a matmul belongs to the layer whose activation it
reads), else their caller's. `per_layer` is the layers' total over `cfg.num_layers`.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
from typing import Optional

#: opcodes that launch no work of their own (aliases, tuples, control flow: its bodies are walked)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
_COUNTED = ("dots", "fusions", "custom_calls", "kernels")

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def _closing(s: str, i: int) -> int:
    """Index just past the parenthesis that closes the one at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "(") - (s[j] == ")")
        if depth == 0:
            return j + 1
    return len(s)


def _opcode(rest: str) -> tuple[str, list[str]]:
    """'<shape> opcode(operands), attrs' -> (opcode, operand names); a tuple shape may hold spaces
    (skip its parentheses)."""
    i = _closing(rest, 0) if rest.startswith("(") else 0
    m = re.match(r"\S*\s+([a-z][\w\-]*)\(", rest[i:])
    if m is None:
        return "", []
    start = i + m.end() - 1
    return m.group(1), re.findall(r"%([\w.\-]+)", rest[start:_closing(rest, start)])


def parse_hlo(text: str) -> tuple[dict, str]:
    """Optimized HLO module text -> ({computation: [instruction dict]}, entry name). Each instruction:
    name, opcode, op_name (metadata), calls (fusion), body / condition / trip (while), branches,
    target (custom call)."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur = comps.setdefault(h.group(2), [])
            entry = h.group(2) if h.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m is None or cur is None:
            continue
        rest = line[m.end():]
        opcode, operands = _opcode(rest)
        ins = {"name": m.group(1), "opcode": opcode, "operands": operands}
        for key, pat in (("op_name", r'op_name="([^"]*)"'), ("calls", r"calls=%?([\w.\-]+)"),
                         ("body", r"body=%?([\w.\-]+)"), ("condition", r"condition=%?([\w.\-]+)"),
                         ("target", r'custom_call_target="([^"]*)"'), ("trip", r'"known_trip_count":\{"n":"(\d+)"'),
                         ("true", r"true_computation=%?([\w.\-]+)"), ("false", r"false_computation=%?([\w.\-]+)")):
            g = re.search(pat, rest)
            if g:
                ins[key] = g.group(1)
        br = re.search(r"branch_computations=\{([^}]*)\}", rest)
        ins["branches"] = [b.strip().lstrip("%") for b in br.group(1).split(",")] if br else []
        ins["branches"] += [ins[k] for k in ("true", "false") if k in ins]
        cur.append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text: pass `compiled.as_text()` of a jitted program")
    return comps, entry


def in_layer(op_name: str) -> bool:
    """Whether an instruction's op_name puts it inside a decoder layer's `layer` / `layerN` scope."""
    return any(re.fullmatch(r"layer\d*", part) for part in op_name.split("/"))


class _Counter:
    def __init__(self, comps):
        self.comps = comps
        self.part = {"layers": collections.Counter(), "other": collections.Counter()}
        self.targets = collections.Counter()
        self.expert_ops = collections.Counter()

    def add(self, what: str, op_name: str, w: int):
        self.part["layers" if in_layer(op_name) else "other"][what] += w

    def walk(self, comp: str, w: int, fused: bool = False, outer_name: str = ""):
        names = {}   # instruction -> its op_name, or else its first operand's that has one, or else the caller's
        for ins in self.comps.get(comp, []):
            op = ins["opcode"]
            name = ins.get("op_name") or next((names[o] for o in ins["operands"] if names.get(o)), "") or outer_name
            names[ins["name"]] = name
            experts = "/experts" in name
            if op in ("dot", "convolution"):
                self.add("dots", name, w)
                if experts:
                    self.expert_ops["dot"] += w
            if op == "custom-call":
                self.add("custom_calls", name, w)
                self.targets[ins.get("target", "?")] += w
                if experts:
                    self.expert_ops["custom-call " + ins.get("target", "?")] += w
            if fused:
                continue
            if op == "fusion":
                self.add("fusions", name, w)
                if experts:
                    self.expert_ops["fusion " + ins["name"].rstrip("0123456789.")] += w
                self.walk(ins["calls"], w, True, name)
            if op not in _FREE:
                self.add("kernels", name, w)
            if op == "while":
                trip = int(ins.get("trip", 1))
                self.walk(ins["body"], w * trip, False, name)
                self.walk(ins["condition"], w * trip, False, name)
            if op == "call" and "calls" in ins:   # to_apply of a call
                self.walk(ins["calls"], w, False, name)
            for b in ins["branches"]:
                self.walk(b, w, False, name)


def _decode_loop(comps, entry: str) -> dict:
    """The decode loop: the entry's while whose body does the most work (the token loop; the
    other top-level whiles, if any, are small)."""
    loops = [i for i in comps[entry] if i["opcode"] == "while"]
    if not loops:
        raise ValueError("the program has no top-level while loop: not a decode program")

    def size(i):
        c = _Counter(comps)
        c.walk(i["body"], 1)
        return sum(c.part["layers"].values()) + sum(c.part["other"].values())
    return max(loops, key=size)


def count_step(hlo_text: str, num_layers: int) -> dict:
    """Counts of one decode step of a compiled decode program's HLO text (see the module doc).

    -> {'total': {dots, fusions, custom_calls, kernels}, 'layers': {...} (all decoder layers),
        'per_layer': {...} (layers / num_layers), 'other': {...}, 'custom_call_targets': {target: n},
        'routed_experts': {op: n} (ops under the `experts` scope: which kernel runs the experts)}."""
    comps, entry = parse_hlo(hlo_text)
    loop = _decode_loop(comps, entry)
    c = _Counter(comps)
    c.walk(loop["body"], 1)
    c.walk(loop["condition"], 1)
    lay, oth = ({k: int(c.part[p][k]) for k in _COUNTED} for p in ("layers", "other"))
    return {"total": {k: lay[k] + oth[k] for k in _COUNTED}, "layers": lay,
            "per_layer": {k: round(lay[k] / num_layers, 2) for k in _COUNTED}, "other": oth,
            "custom_call_targets": dict(c.targets), "routed_experts": dict(c.expert_ops)}


def decode_step_hlo(params, cfg, batch: int, cache_len: int, dispatch: Optional[str] = None) -> str:
    """Optimized HLO text of `generation.decode.decode` for one token at a time (max_steps=1), batch
    `batch`, a KV cache of `cache_len` rows, greedy sampling, on `params` as `generate` passes them
    (after `prepare_params`). params may be arrays or jax.ShapeDtypeStruct (nothing is run)."""
    import jax
    import jax.numpy as jnp
    from ..generation.decode import DecodeState, decode, prefill
    from ..generation.sampling import Sampling
    from ..model.transformer import prepare_params

    if batch < 1 or cache_len < 2:
        raise ValueError(f"batch ({batch}) must be >= 1 and cache_len ({cache_len}) >= 2")
    sds = jax.ShapeDtypeStruct
    prepared = jax.eval_shape(lambda p: prepare_params(p, cfg), params)
    deltas = sds((batch, *cfg.delta_shape), jnp.float32)
    lengths = sds((batch,), jnp.int32)
    _, cache, _ = jax.eval_shape(lambda p, t, n, d: prefill(p, t, n, d, cfg, cache_len, None, dispatch),
                                 prepared, sds((batch, 1), jnp.int32), lengths, deltas)
    state = DecodeState(sds((batch, cache_len), jnp.int32), lengths, sds((batch, cfg.vocab_size), jnp.float32),
                        sds((batch,), jnp.bool_), sds((batch,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
    lowered = decode.lower(prepared, state, cache, deltas, sds((1,), jnp.int32), sds((), jnp.int32), cfg,
                           Sampling(), 1, None, dispatch)
    return lowered.compile().as_text()


def decode_step_counts(params, cfg, batch: int = 1, cache_len: int = 256, dispatch: Optional[str] = None) -> dict:
    """count_step of the compiled decode step (see decode_step_hlo), with the backend and shape."""
    import jax
    out = count_step(decode_step_hlo(params, cfg, batch, cache_len, dispatch), cfg.num_layers)
    return {"backend": jax.default_backend(), "batch": batch, "cache_len": cache_len,
            "dispatch": dispatch or cfg.dispatch, "num_layers": cfg.num_layers, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.opcount",
                                description="Op counts of the compiled decode step (random weights, nothing run).")
    p.add_argument("--config", default=None,
                   help="an HF config.json (default: the benchmark model, bench.models.Shape)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--dispatch", default=None, help="expert dispatch path (default: the config's, 'auto')")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    import jax
    from ..io import families
    from ..model.weights import init_params
    hf = json.loads(open(a.config).read()) if a.config else shape_hf_config()
    cfg = families.from_hf(hf, dtype=a.dtype)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    print(json.dumps(decode_step_counts(params, cfg, a.batch, a.cache_len, a.dispatch), indent=1))
    return 0


def shape_hf_config(shape=None) -> dict:
    """The HF config dict of the benchmark model (`bench.models.Shape`, OLMoE architecture)."""
    from .models import Shape
    s = shape or Shape()
    return {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": s.vocab,
            "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.heads, "num_experts": s.experts,
            "num_experts_per_tok": s.top_k, "max_position_embeddings": 8192, "initializer_range": s.init_std}


if __name__ == "__main__":
    raise SystemExit(main())
