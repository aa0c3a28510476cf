"""Methods: which prompts, how many samples, and which rewiring options. Composable with '+'.

    parse_method("baseline")                      -> Method(icl=0, sc=0, rewire=None)
    parse_method("icl:3+rewire")                  -> 3-shot prompts, rewired with the default options
    parse_method("sc:3+rewire[selection=hard,continuous=false]")
    parse_method("rewire[selection=last_k,last_k=5]")   # any RewireOptions field, typed by its default
    parse_method("rewire:selection=hard,ratio=0.25")    # the same options in the colon form
    parse_method("shift:2+rewire")                # 2 demonstrations from OTHER tasks (context shift)
    parse_method("c3po[variant=released,k=3]")    # C3PO re-mixed routing (eval/c3po.py: C3POOptions)

sc:k draws k sampled paths per problem (temperature/top-p of the run) and aggregates them (majority
vote, or pass@k for code). sc:k+rewire puts the k copies of the prompt in ONE batch: the first
phase runs on identical rows and yields identical deltas in each (deterministic), then every row
samples its own path (one PRNG key per batch, independent per-row draws) and keeps re-optimising on
its own text: "optimise on the prompt once, then k paths from those deltas", not k separate runs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from rewire_jax import RewireOptions


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    icl: int = 0                              # demonstrations prepended to the prompt
    sc: int = 0                               # 0: one greedy sample; k: k sampled paths
    rewire: Optional[RewireOptions] = None    # None: no optimisation (deltas stay 0)
    shift: int = 0                            # demonstrations from other tasks (tasks.SHIFT_TASKS)
    c3po: Optional[Any] = None                # eval.c3po.C3POOptions: C3PO re-mixed routing (not with rewire)

    @property
    def samples(self) -> int:
        return max(1, self.sc)


def _typed(field: dataclasses.Field, value: str):
    default = field.default
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"rewire option {field.name} is a bool (true/false), got {value!r}")
        return value.lower() in ("true", "1")
    return type(default)(value)


def rewire_options(overrides: str, base: RewireOptions) -> RewireOptions:
    """'selection=hard,ratio=0.25' applied to `base` (fields of RewireOptions)."""
    fields = {f.name: f for f in dataclasses.fields(RewireOptions)}
    kw = {}
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        key, _, value = item.partition("=")
        if key not in fields or not _:
            raise ValueError(f"bad rewire option {item!r}; fields: {', '.join(fields)}")
        kw[key] = _typed(fields[key], value)
    return dataclasses.replace(base, **kw)


def parse_method(spec: str, base: RewireOptions = RewireOptions()) -> Method:
    """Parse 'baseline' | parts joined by '+': 'icl:K', 'shift:K', 'sc:K', 'rewire', 'rewire[k=v,...]' or
    'rewire:k=v,...' (the colon form; the same options)."""
    counts = {"icl": 0, "sc": 0, "shift": 0}
    rewire = c3po = None
    parts = re.findall(r"[^+\[]+(?:\[[^\]]*\])?", spec.strip())
    if not parts or "+".join(parts) != spec.strip():
        raise ValueError(f"bad method {spec!r}")
    for part in (p.strip() for p in parts):
        m = re.fullmatch(r"(icl|sc|shift):(\d+)", part)
        if m:
            k = int(m.group(2))
            if k < 1:
                raise ValueError(f"{part}: k must be >= 1")
            counts[m.group(1)] = k
        elif part == "baseline":
            pass
        elif re.fullmatch(r"c3po(?:\[.*\]|:.+)?", part):
            from .c3po import parse_options
            inner = re.fullmatch(r"c3po(?:\[(.*)\]|:(.+))?", part)
            c3po = parse_options(inner.group(1) or inner.group(2) or "")
        elif part.startswith("rewire"):
            inner = re.fullmatch(r"rewire(?:\[(.*)\]|:(.+))?", part)
            if inner is None:
                raise ValueError(f"bad rewire part {part!r} in method {spec!r} (rewire, rewire[k=v,...] or "
                                 f"rewire:k=v,...)")
            rewire = rewire_options(inner.group(1) or inner.group(2) or "", base)
        else:
            raise ValueError(f"unknown method part {part!r} in {spec!r} (baseline, rewire[...], rewire:k=v, "
                             f"icl:K, shift:K, sc:K)")
    icl, sc, shift = counts["icl"], counts["sc"], counts["shift"]
    if icl and shift:
        raise ValueError(f"{spec!r}: icl:K (aligned) and shift:K (shifted demonstrations) exclude each other")
    if spec.strip() == "baseline" or rewire is None or not rewire.enabled:
        rewire = None
    if c3po is not None and rewire is not None:
        raise ValueError(f"{spec!r}: c3po and rewire cannot be combined (both set the routing)")
    return Method(spec.strip(), icl, sc, rewire, shift=shift, c3po=c3po)
