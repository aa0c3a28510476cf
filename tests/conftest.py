import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

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
