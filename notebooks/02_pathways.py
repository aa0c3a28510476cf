# %% [markdown]
# # Expert pathways before and after rerouting (paper Fig. 2, App. B.2)
#
# Optimise the deltas on the first 192 tokens of held-out stdlib modules, then compare, on the
# same tokens, the experts each token is routed to with deltas 0 and with the optimised deltas:
# the Levenshtein edit distance between pathway strings per layer, and the per-layer expert
# utilisation.

# %%
import matplotlib.pyplot as plt
import numpy as np

import rewire_jax
from rewire_jax import analysis
from rewire_jax.cli import DEMO_MODEL
from rewire_jax.demo import corpus, data

model = rewire_jax.load(DEMO_MODEL)
cfg = model.config
docs = data.documents(model.tokenizer, corpus.heldout_files(), 192, 192)[:8]
rewire = rewire_jax.rewirer(model)  # paper defaults: soft weighting, 5 Adam steps
print(len(docs), "documents of", len(docs[0]), "tokens")

# %%
before, after, per_layer = [], [], []
for doc in docs:
    deltas = rewire.step(model.params, rewire_jax.zero_deltas(cfg), doc).deltas
    t0, t1 = analysis.trace(model, doc), analysis.trace(model, doc, deltas)
    before.append(t0.idx)
    after.append(t1.idx)
    per_layer.append(analysis.layer_edit_distance(t0.idx, t1.idx))
idx0, idx1 = np.concatenate(before, axis=1), np.concatenate(after, axis=1)
path_dist = analysis.pathway_edit_distance(idx0, idx1)
print("tokens whose pathway changed: %.1f%%" % (100 * np.mean(path_dist > 0)))
print("mean pathway edit distance: %.3f" % path_dist.mean())

# %%
u0, u1 = analysis.utilisation(idx0, cfg.num_experts), analysis.utilisation(idx1, cfg.num_experts)
fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
ax[0].bar(np.arange(cfg.num_moe_layers), np.mean(per_layer, axis=0))
ax[0].set(xlabel="MoE layer", ylabel="mean edit distance", title="per-layer pathway edit distance")
ax[0].set_xticks(range(cfg.num_moe_layers))
shift = u1 - u0
for a, u, t, kw in ((ax[1], u0, "utilisation, deltas 0", dict(cmap="viridis")),
                    (ax[2], shift, "utilisation shift (after - before)",
                     dict(cmap="coolwarm", vmin=-np.abs(shift).max(), vmax=np.abs(shift).max()))):
    im = a.imshow(u, aspect="auto", interpolation="nearest", **kw)
    a.set(xlabel="expert", ylabel="MoE layer", title=t, yticks=range(cfg.num_moe_layers))
    fig.colorbar(im, ax=a)
plt.tight_layout()
plt.show()
print("total-variation utilisation shift per layer:", analysis.utilisation_shift(idx0, idx1, cfg.num_experts).round(4))
