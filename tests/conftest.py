import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# XLA:CPU compiles at backend optimisation level 0 (LLVM -O0) in the tests: compiling is most of the
# suite's time and 0 cuts it ~40% (a rewired generate on the tiny OLMoE: 45 s of XLA compile -> 26 s,
# same machine and load), while the tiny models' run time does not matter. No fast-math at any level,
# but code generation differs, so results can differ in the last float bits from a default-level run
# (every parity tolerance holds unchanged at 0). The benchmarks and library users compile at XLA's
# default; `rewire-jax generate` at 0 unless `--cpu-compile optimized`.
# Set --xla_backend_optimization_level in XLA_FLAGS yourself to test at another level. Read by jax at
# import (here, and in every subprocess the tests start, which inherit the environment).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

#: XLA:CPU's MLIR fusion emitters (its default) spend about a third of the CPU time of compiling the
#: tiny models' programs; with the older elemental emitters a compile-bound test took 78-86 s of CPU
#: instead of 120 s (tests/test_queue.py, 2026-12-03, 2-core EPYC) and every tolerance holds. An XLA
#: that does not know the flag aborts at start-up, so a subprocess tries it first, once (the xdist
#: workers and the tests' subprocesses inherit XLA_FLAGS). Put the flag in XLA_FLAGS yourself to
#: choose.
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters"


def _xla_knows(flag: str) -> bool:
    import subprocess
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}", JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)
    return probe.returncode == 0


if EMITTER_FLAG not in os.environ["XLA_FLAGS"] and _xla_knows(f"{EMITTER_FLAG}=false"):
    os.environ["XLA_FLAGS"] += f" {EMITTER_FLAG}=false"
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

#: env var naming the run's shared compilation cache (set by the controller, inherited by the xdist
#: workers and by every subprocess the tests spawn)
CACHE_ENV = "REWIRE_JAX_TEST_COMPILE_CACHE"


@pytest.hookimpl(trylast=True)   # after the tmp_path plugin set up the basetemp
def pytest_configure(config):
    """One JAX persistent compilation cache per test run, `<run's basetemp>/jax-cache`, shared by
    the xdist workers and the subprocesses the tests start (workers, CLI runs, notebook kernels):
    a program compiled by one file is loaded, not compiled again, by the next. Every program is
    kept (no minimum compile time or size). Subprocesses get it through JAX's own env vars, read
    when jax is imported; this process (and each worker) through jax.config."""
    cache = os.environ.get(CACHE_ENV)
    if not cache:   # the controller (or a run without xdist)
        cache = str(config._tmp_path_factory.getbasetemp() / "jax-cache")
        os.makedirs(cache, exist_ok=True)
        os.environ[CACHE_ENV] = cache
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                       "REWIRE_JAX_COMPILE_CACHE": cache})   # the CLI's default, for its subprocess runs
    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):   # the controller: the next run starts from its own cache
        os.environ.pop(CACHE_ENV, None)

import hf_models  # noqa: E402

# The torch oracles run tiny models: one intra-op thread is fastest, and on a shared 2-core machine
# a second spinning thread makes each forward ~10x slower (measured).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """name -> (torch model, saved directory), built lazily once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            model = hf_models.build(name)
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            cache[name] = (model, d)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def loaded(hf_dirs):
    """name -> (torch model, rewire_jax Model)."""
    import rewire_jax
    cache = {}

    def get(name):
        if name not in cache:
            tm, d = hf_dirs(name)
            cache[name] = (tm, rewire_jax.load(d))
        return cache[name]
    return get


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jit caches after every test module: hundreds of XLA:CPU executables kept alive in one
    process crashed the compiler (SIGSEGV/abort in backend_compile) late in the suite."""
    yield
    import jax
    jax.clear_caches()
