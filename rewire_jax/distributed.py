"""Multi-host runs: `jax.distributed.initialize` from flags or the usual environment variables.

Every host runs the same command; JAX's distributed runtime then sees all devices of all hosts
(`jax.devices()`), a mesh (`--mesh`) spans them, and `rewire_jax.load(..., mesh=)` reads on each
host only the shards its own devices hold. Only process 0 prints and writes (`is_main`).

Flags (CLI: --coordinator, --num-processes, --process-id) or environment:
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
On Cloud TPU slices (and SLURM / Open MPI clusters) `--distributed auto` lets JAX find them itself.
Without any of these: a single process, nothing to initialise.
"""
from __future__ import annotations

import os
from typing import Optional

_initialised = False


def add_arguments(parser) -> None:
    """--mesh and the multi-host flags, shared by every command (generate, eval, convert, bench)."""
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help="shard over devices: e.g. data=1,expert=4,tensor=2 (axes data, fsdp, expert, "
                             "tensor; their product = number of devices of all hosts); default one device")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-host: address of process 0 (env JAX_COORDINATOR_ADDRESS); 'auto' on Cloud "
                             "TPU / SLURM")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes "
                        "(env JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process (env JAX_PROCESS_ID)")


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Start JAX's distributed runtime when asked to (flags, else environment); -> whether it is
    multi-process. Idempotent. Must run before anything touches the devices."""
    global _initialised
    import jax
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if _initialised:
        return jax.process_count() > 1
    if coordinator is None:
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        try:   # CPU collectives across processes (the localhost test; no effect on TPU / GPU)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:
            pass
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    _initialised = True
    return jax.process_count() > 1


def from_args(a) -> bool:
    return initialize(getattr(a, "coordinator", None), getattr(a, "num_processes", None),
                      getattr(a, "process_id", None))


def is_main() -> bool:
    """True in process 0 (the one that prints and writes), and in a single-process run."""
    import jax
    return jax.process_index() == 0


def main_print(*args, **kw) -> None:
    if is_main():
        print(*args, **kw)
