"""The held-out NLL experiment's machinery on a tiny model (the real run uses the demo model)."""
import numpy as np

import hf_models
from rewire_jax import RewireOptions
from rewire_jax.experiments import heldout_nll as E
from rewire_jax.model import forward
from rewire_jax.rewire import Rewirer


def test_evaluate_matches_manual_cycle(loaded):
    _, model = loaded("olmoe")
    docs = np.stack([hf_models.prompt(20, seed=s) for s in (1, 2)])
    base = E.evaluate(model, docs, 12, 4, None)
    # baseline by hand: mean NLL of tokens 12..19 given their prefix
    logits, _ = forward(model.params, docs, np.zeros((2, *model.config.delta_shape), np.float32), model.config)
    logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    manual = [-np.mean([logp[b, t - 1, docs[b, t]] for t in range(12, 20)]) for b in range(2)]
    np.testing.assert_allclose(base, manual, rtol=1e-5)
    # static: one phase on the prefix then the same scoring with the new deltas
    opts = RewireOptions(continuous=False)
    static = E.evaluate(model, docs, 12, 4, opts)
    d = Rewirer(model.config, opts).step(model.params, np.zeros((2, *model.config.delta_shape)), docs[:, :12]).deltas
    np.testing.assert_allclose(static, np.asarray(E.span_nll(model.params, docs, d, 12, 20, model.config)), rtol=1e-5)
    cont = E.evaluate(model, docs, 12, 4, RewireOptions())
    assert cont.shape == (2,) and not np.allclose(cont, static)


def test_table_formats_every_row():
    res = {"baseline (deltas 0)": {"s": np.array([1.0, 2.0])}, "soft (paper default)": {"s": np.array([0.5, 1.5])}}
    t = E.table(res, ["s"])
    assert "| soft (paper default) | 1.0000 ± 0.5000 | -0.5000 ± 0.0000 |" in t
