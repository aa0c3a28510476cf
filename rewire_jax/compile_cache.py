"""JAX's persistent compilation cache for the CLI: compiled XLA programs kept on disk, so a second
run of the same command skips (most of) compilation.

The default directory is per user and keyed by backend and host CPU features,
`~/.cache/rewire-jax/jax-cache/<backend>-<hash>` (`$XDG_CACHE_HOME` honoured): XLA:CPU code is
compiled for this CPU's instruction set, so a home directory shared by different machines must not
share entries. Set through `jax.config` before the first compilation (never read at trace time).
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Optional


def cpu_features() -> str:
    """The host CPU's model and instruction-set flags (Linux /proc/cpuinfo; else `platform`)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    lines = sorted({line.split(":", 1)[1].strip() for line in info.splitlines()
                    if ":" in line and line.split(":", 1)[0].strip() in keep})
    return "\n".join([platform.machine(), platform.processor(), *lines])


def default_dir(backend: Optional[str] = None) -> Path:
    """~/.cache/rewire-jax/jax-cache/<backend>-<12 hex of the CPU features and accelerator kind>."""
    import jax

    backend = backend or jax.default_backend()
    kinds = sorted({d.device_kind for d in jax.devices()}) if backend != "cpu" else []
    key = hashlib.sha256("\n".join([cpu_features(), *kinds]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "rewire-jax" / "jax-cache" / f"{backend}-{key}"


def enable(cache_dir: str | Path, min_compile_secs: float = 0.0, min_entry_bytes: int = 0) -> Path:
    """Point JAX's persistent compilation cache at `cache_dir` (created) for this process; every
    program at least `min_compile_secs` to compile and `min_entry_bytes` big is kept (default: all;
    a cache hit is cheaper than compiling even a small program). RoPE's torch-computed frequency
    tables are kept in a per-CPU folder of it (`model.rope_table.keep`)."""
    import jax

    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache {str(cache_dir)!r} is not a usable directory ({e}); pass a "
                         f"writable --compile-cache DIR or --no-compile-cache") from None
    if not os.access(cache_dir, os.W_OK):
        raise ValueError(f"compile cache {str(cache_dir)!r} is not writable; pass a writable "
                         f"--compile-cache DIR or --no-compile-cache")
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_bytes)
    # a rerun traces every program again (the cache key is the lowered program) and RoPE's tables
    # import torch at trace time (~1 s): keep them beside the programs, per CPU (model/rope_table.py)
    from .model import rope_table
    rope_table.keep(cache_dir / f"rope-{hashlib.sha256(cpu_features().encode()).hexdigest()[:12]}")
    return cache_dir


CPU_OPT_FLAG = "--xla_backend_optimization_level"
# installed plugins that give JAX an accelerator backend; the flag would reach their code generators too
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _has_accelerator_plugin() -> bool:
    import importlib.metadata
    import importlib.util

    if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
        return True
    return bool(list(importlib.metadata.entry_points(group="jax_plugins")))


def fast_cpu_compile(level: int = 0) -> bool:
    """Compile XLA:CPU programs at backend (LLVM) optimisation `level` in this process, before JAX's
    backend starts (XLA reads its flags once). Level 0 about halves the compile time of the demo
    model's programs, which is most of a short run's wall time. No fast-math at any level, but code
    generation differs, so results can differ in the last float bits (the demo's main command: the
    same tokens, losses equal to ~1e-7); the test suite runs at level 0 with every parity tolerance
    unchanged.
    Left alone, returning False, when XLA_FLAGS already sets the level, when an accelerator plugin is
    installed (the flag would reach its code generator too) or when the backend has already started."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_OPT_FLAG in flags or _has_accelerator_plugin() or xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_OPT_FLAG}={int(level)}".strip()
    return True
