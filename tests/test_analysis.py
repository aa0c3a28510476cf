"""Routing analyses: pathways, edit distances, utilisation, entropy, confidence."""
import numpy as np

import hf_models
from rewire_jax import analysis
from rewire_jax.model.routers import token_confidence


def test_pathway_strings_and_distances():
    a = np.array([[[3, 1], [0, 2]], [[5, 4], [5, 4]]])            # [L=2, T=2, k=2]
    b = a.copy()
    b[1, 0] = [5, 7]
    assert analysis.pathways(a) == ["3,1-5,4", "0,2-5,4"]
    np.testing.assert_array_equal(analysis.pathway_edit_distance(a, b), [1, 0])
    np.testing.assert_array_equal(analysis.layer_edit_distance(a, b), [0, 0.5])
    np.testing.assert_array_equal(analysis.pathway_edit_distance(a, a), [0, 0])


def test_utilisation_and_shift():
    a = np.array([[[0, 1], [0, 1]]])                                # L=1, T=2, k=2
    b = np.array([[[2, 3], [2, 3]]])
    np.testing.assert_allclose(analysis.utilisation(a, 4), [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(analysis.utilisation_shift(a, b, 4), [1.0])
    np.testing.assert_allclose(analysis.utilisation_shift(a, a, 4), [0.0])
    bal = analysis.load_balance(np.array([[[0], [1], [2], [3]]]), 4)
    np.testing.assert_allclose(bal["max_over_mean"], [1.0])
    np.testing.assert_allclose(bal["normalised_entropy"], [1.0])


def test_trace_on_model(loaded):
    _, model = loaded("olmoe")
    toks = hf_models.prompt(9)
    t0 = analysis.trace(model, toks)
    L, E = model.config.delta_shape
    assert t0.idx.shape == (L, 9, 2) and t0.probs.shape == (L, 9, E)
    np.testing.assert_allclose(t0.probs.sum(-1), 1, atol=1e-5)
    # confidence is Eq. 2 on the same probabilities; entropy within [0, log E]
    ref = np.asarray(token_confidence(np.log(t0.probs), t0.idx))
    np.testing.assert_allclose(t0.confidence, ref, rtol=1e-4)
    assert np.all(t0.entropy >= 0) and np.all(t0.entropy <= np.log(E) + 1e-5)
    # a large delta on expert 0 of layer 1 reroutes that layer (and maybe later ones), not layer 0
    d = np.zeros((L, E), np.float32)
    d[1, 0] = 20.0
    t1 = analysis.trace(model, toks, d)
    assert np.all(t1.idx[1, :, 0] == 0)
    np.testing.assert_array_equal(t1.idx[0], t0.idx[0])
    shift = analysis.utilisation_shift(t0.idx, t1.idx, E)
    assert shift[0] == 0 and shift[1] > 0
    assert analysis.layer_edit_distance(t0.idx, t1.idx)[1] > 0
