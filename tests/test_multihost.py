"""Multi-host: 2 processes on localhost (4 simulated CPU devices each, JAX's CPU collectives over
the distributed runtime) give the same tokens and deltas as one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import rewire_jax
from rewire_jax import RewireOptions

WORKER = Path(__file__).parent / "multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(hf_dirs, tmp_path):
    _, d = hf_dirs("olmoe")
    out = tmp_path / "out.json"
    coord = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(d), coord, str(i), str(out), "expert=4,tensor=2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, logs):
        assert p.returncode == 0, e[-4000:]
    got = json.loads(out.read_text())
    assert got["process_count"] == 2
    model = rewire_jax.load(d)
    prompts = [[5, 9, 17, 33, 60, 71, 99, 4, 12, 7], [8, 3, 44, 90, 21, 5, 6]]
    ref = rewire_jax.generate(model, prompts, 6, rewire=RewireOptions(interval=3, steps=3, lr=0.1), eos_token_id=None)
    assert got["tokens"] == [list(map(int, t)) for t in ref.tokens]
    assert np.abs(np.asarray(got["deltas"]) - np.asarray(ref.deltas)).max() <= 1e-4
    assert np.abs(np.asarray(ref.deltas)).max() > 1e-2
