"""`rewire-jax env`: what a bug report needs about this installation (versions, backend, devices,
where compiled programs are cached)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# distributions reported when installed (torch is optional: only the tests' reference models need it)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
            "numpy", "torch")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """The report as a dict: `rewire_jax`, `python`, `platform`, `packages` {name: version or None},
    `backend`, `devices` [str], `process_count`, `compile_cache` (JAX's
    `jax_compilation_cache_dir`, None when no persistent compilation cache is configured),
    `cli_compile_cache` (where `rewire-jax generate` keeps compiled programs unless
    `--no-compile-cache`: `$REWIRE_JAX_COMPILE_CACHE` or `compile_cache.default_dir()`)."""
    import jax

    from . import __version__, compile_cache

    return {
        "rewire_jax": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "compile_cache": jax.config.jax_compilation_cache_dir or None,
        "cli_compile_cache": str(os.environ.get("REWIRE_JAX_COMPILE_CACHE") or compile_cache.default_dir()),
    }


def format_report(info: dict) -> str:
    """The report as aligned `key: value` lines (what `rewire-jax env` prints)."""
    rows = [("rewire-jax", info["rewire_jax"]), ("python", info["python"]),
            ("platform", info["platform"]), ("cpu count", info["cpu_count"])]
    rows += [(name, version or "not installed") for name, version in info["packages"].items()]
    rows += [("backend", info["backend"]),
             ("devices", f"{len(info['devices'])}: " + ", ".join(info["devices"])),
             ("processes", info["process_count"]),
             ("compile cache", info["compile_cache"] or "not configured (jax_compilation_cache_dir unset)"),
             ("cli compile cache", f"{info['cli_compile_cache']} (rewire-jax generate; --no-compile-cache: none)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
