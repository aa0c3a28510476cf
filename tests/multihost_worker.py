"""Worker for tests/test_multihost.py: one of 2 processes on localhost (4 simulated CPU devices
each, JAX's CPU collectives), running the same command: load a tiny model onto an 8-device mesh
spanning both processes, rewired generate; process 0 writes tokens and deltas as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main():
    model_dir, coordinator, pid, out, mesh = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    from rewire_jax import distributed
    assert distributed.initialize(coordinator, 2, pid)
    import jax
    import rewire_jax
    from rewire_jax import RewireOptions
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    model = rewire_jax.load(model_dir, mesh=mesh)
    # this process holds only its own shards of the experts
    gp = jax.tree.leaves(model.params["stacks"])[0]
    prompts = [[5, 9, 17, 33, 60, 71, 99, 4, 12, 7], [8, 3, 44, 90, 21, 5, 6]]
    res = rewire_jax.generate(model, prompts, 6, rewire=RewireOptions(interval=3, steps=3, lr=0.1),
                              eos_token_id=None)
    if distributed.is_main():
        Path(out).write_text(json.dumps({"tokens": [list(map(int, t)) for t in res.tokens],
                                         "deltas": np.asarray(res.deltas).tolist(),
                                         "process_count": jax.process_count()}))
    print("done", pid, flush=True)


if __name__ == "__main__":
    main()
