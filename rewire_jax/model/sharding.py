"""Device meshes and logical axis rules: how every weight, and the batch, is laid out over devices.

The mesh has four named axes (any may be 1):
    data    batch (sequences): each sequence keeps its own deltas, Adam state and KV cache rows
    fsdp    weights split along their "rest" dimension (embed / vocab / latent), batch too
    expert  routed experts (expert parallelism: `model/expert_parallel.py`)
    tensor  expert width, dense-MLP width and attention heads (tensor parallelism)

Every weight declares one logical axis name per dimension (`model/weights.py`); `RULES` maps each
logical name to mesh axes. Rules are applied dimension by dimension, left to right:
  - a logical name with no rule (or rule None) is replicated;
  - a mesh axis already used by an earlier dimension of the same weight is dropped (a mesh axis
    shards at most one dimension), and so are mesh axes of size 1;
  - **a dimension whose size does not divide the product of its mesh axes is replicated** (with a
    tuple rule, the longest prefix of the tuple that divides is kept), e.g. 6 heads on tensor=4,
    or the tiny test models' dims on an 8-way axis. The model stays exact; only memory is lost.
The leading "layers" axis of a layer stack is never sharded. Override with `rules=` (a dict or a
sequence of (logical, mesh axes) pairs, merged over `RULES`).

Under jit, GSPMD propagates these shardings through the dense parts (attention, dense MLPs, the
LM head); the routed experts run in `shard_map` (`expert_parallel.moe_dispatch`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rule = Union[None, str, tuple]

#: logical axis -> mesh axis (or tuple of mesh axes); see the module docstring for the fallbacks
RULES: dict[str, Rule] = {
    "batch": ("data", "fsdp"),
    "experts": "expert",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "heads": "tensor",
    "embed": "fsdp",
    "vocab": "fsdp",
    "latent": "fsdp",
    "head_dim": None,
    "layers": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes data, fsdp, expert,
    tensor. The product of the sizes must equal the number of devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = (data, fsdp, expert, tensor)
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"mesh sizes must be >= 1, got data={data} fsdp={fsdp} expert={expert} tensor={tensor}")
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={data} fsdp={fsdp} expert={expert} tensor={tensor} has {math.prod(sizes)} "
                         f"devices; there are {len(devices)} ({jax.default_backend()})")
    try:   # topology-aware device order on TPU / GPU slices
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=1,expert=4,tensor=2' -> {'data': 1, 'expert': 4, 'tensor': 2} (unnamed axes are 1)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated NAME=SIZE with NAME in "
                             f"{', '.join(MESH_AXES)} (e.g. data=1,expert=4,tensor=2)")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name} is not an integer") from None
    return out


def mesh_from_spec(spec: Union[None, str, Mapping[str, int], Mesh], devices=None) -> Optional[Mesh]:
    """None | 'expert=4,tensor=2' | {'expert': 4, ...} | a Mesh -> Mesh or None."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    return make_mesh(**sizes, devices=devices)


def merged_rules(rules: Union[None, Mapping[str, Rule], Sequence[tuple]] = None) -> dict[str, Rule]:
    out = dict(RULES)
    if rules is not None:
        out.update(dict(rules))
    return out


def _as_tuple(rule: Rule) -> tuple:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def spec_for(shape: Sequence[int], axes: Sequence[Optional[str]], mesh: Mesh, rules=None) -> P:
    """PartitionSpec of one array with these logical axes under the rules (fallbacks: module doc)."""
    rules = merged_rules(rules)
    used: set[str] = set()
    out = []
    for size, name in zip(shape, axes):
        cand = [a for a in _as_tuple(rules.get(name) if name is not None else None)
                if a not in used and mesh.shape.get(a, 1) > 1]
        while cand and size % math.prod(mesh.shape[a] for a in cand):
            cand.pop()
        used.update(cand)
        out.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_specs(cfg, mesh: Mesh, rules=None) -> dict:
    """Param tree of PartitionSpecs for `cfg`'s declared weights."""
    from .weights import declarations, map_weights
    rules = merged_rules(rules)
    return map_weights(lambda w: spec_for(w.shape, w.axes, mesh, rules), declarations(cfg))


def param_shardings(cfg, mesh: Mesh, rules=None) -> dict:
    """Param tree of NamedShardings (what `load(..., mesh=)` places the weights with)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_axes(batch: int, mesh: Mesh, rules=None) -> Optional[Union[str, tuple]]:
    """Mesh axes that shard a batch of `batch` sequences (None: replicated)."""
    spec = spec_for((batch,), ("batch",), mesh, merged_rules(rules))
    return spec[0] if len(spec) else None


def batch_sharding(batch: int, ndim: int, mesh: Mesh, rules=None) -> NamedSharding:
    """Sharding of a [batch, ...] array (tokens, deltas, Adam state, KV cache rows) on the batch axes."""
    return NamedSharding(mesh, P(batch_axes(batch, mesh, rules), *([None] * (ndim - 1))))


def constrain_batch(x, mesh: Optional[Mesh]):
    """Inside jit: lay x [B, ...] out on the batch axes (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(x.shape[0], x.ndim, mesh))


def shard_params(params, cfg, mesh: Mesh, rules=None):
    """Place an existing (host or single-device) param tree onto the mesh by the rules."""
    shardings = param_shardings(cfg, mesh, rules)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


class MeshShape:
    """Just the axis sizes of a mesh (no devices): enough for `spec_for`, e.g. to plan a slice."""

    def __init__(self, **sizes):
        self.shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}


def bytes_per_device(cfg, sizes: Mapping[str, int], rules=None) -> int:
    """Bytes of the weights one device holds on a mesh of these axis sizes (cfg's dtype)."""
    from .weights import declarations, map_weights
    mesh, rules = MeshShape(**sizes), merged_rules(rules)

    def one(w):
        spec = spec_for(w.shape, w.axes, mesh, rules)
        n = math.prod(w.shape)
        for part in spec:
            n //= math.prod(mesh.shape[a] for a in _as_tuple(part))
        return n * np.dtype(w.dtype(cfg)).itemsize
    return int(sum(jax.tree.leaves(map_weights(one, declarations(cfg)))))


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        return "single device"
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def with_mesh(cfg, mesh: Any):
    """cfg with its `mesh` execution setting (static under jit; the MoE runs expert-parallel)."""
    return cfg.replace(mesh=mesh)
