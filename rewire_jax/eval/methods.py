"""Methods: which prompts, how many samples, and which rewiring options. Composable with '+'.

    parse_method("baseline")                      -> Method(icl=0, sc=0, rewire=None)
    parse_method("icl:3+rewire")                  -> 3-shot prompts, rewired with the default options
    parse_method("sc:3+rewire[selection=hard,continuous=false]")
    parse_method("rewire[selection=last_k,last_k=5]")   # any RewireOptions field, typed by its default

sc:k draws k sampled paths per problem (temperature/top-p of the run) and aggregates them (majority
vote, or pass@k for code). sc:k+rewire puts the k copies of the prompt in ONE batch: the first
phase runs on identical rows and yields identical deltas in each (deterministic), then every row
samples its own path (one PRNG key per batch, independent per-row draws) and keeps re-optimising on
its own text: "optimise on the prompt once, then k paths from those deltas", not k separate runs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from rewire_jax import RewireOptions


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    icl: int = 0                              # demonstrations prepended to the prompt
    sc: int = 0                               # 0: one greedy sample; k: k sampled paths
    rewire: Optional[RewireOptions] = None    # None: no optimisation (deltas stay 0)

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
    """Parse 'baseline' | parts joined by '+': 'icl:K', 'sc:K', 'rewire' or 'rewire[k=v,...]'."""
    icl = sc = 0
    rewire = None
    parts = re.findall(r"[^+\[]+(?:\[[^\]]*\])?", spec.strip())
    if not parts or "+".join(parts) != spec.strip():
        raise ValueError(f"bad method {spec!r}")
    for part in (p.strip() for p in parts):
        m = re.fullmatch(r"(icl|sc):(\d+)", part)
        if m:
            k = int(m.group(2))
            if k < 1:
                raise ValueError(f"{part}: k must be >= 1")
            icl, sc = (k, sc) if m.group(1) == "icl" else (icl, k)
        elif part == "baseline":
            pass
        elif part.startswith("rewire"):
            inner = re.fullmatch(r"rewire(?:\[(.*)\])?", part)
            if inner is None:
                raise ValueError(f"bad rewire part {part!r} in method {spec!r}")
            rewire = rewire_options(inner.group(1) or "", base)
        else:
            raise ValueError(f"unknown method part {part!r} in {spec!r} (baseline, rewire[...], icl:K, sc:K)")
    if spec.strip() == "baseline" or rewire is None or not rewire.enabled:
        rewire = None
    return Method(spec.strip(), icl, sc, rewire)
