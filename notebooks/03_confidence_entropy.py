# %% [markdown]
# # Layer confidence and router entropy (paper Fig. 3 and Fig. 5)
#
# Layer confidence `C_l` (Eq. 2-3) decides which layers rewiring updates. Left: its distribution
# per layer on held-out code vs English prose (does the domain change which layers look
# "confident"?). Right: router entropy along a generation, baseline vs rewired. The sizes are the
# next cell's (tagged `parameters`: `tests/test_notebooks.py` runs the notebook with smaller ones).

# %% tags=["parameters"]
num_docs = 12          # documents per domain for the layer confidence
max_new_tokens = 96    # tokens generated, baseline and rewired
interval = 32          # re-optimise every `interval` generated tokens

# %%
import matplotlib.pyplot as plt
import numpy as np

import rewire_jax
from rewire_jax import RewireOptions, analysis
from rewire_jax.cli import DEMO_MODEL
from rewire_jax.demo import corpus, data

model = rewire_jax.load(DEMO_MODEL)
cfg = model.config
code = data.documents(model.tokenizer, corpus.heldout_files(), 128, 128)[:num_docs]
prose = data.text_documents(model.tokenizer, list(corpus.prose_topics().values()), 128, 128)[:num_docs]
conf = {name: np.stack([analysis.trace(model, d).layer_confidence for d in docs])
        for name, docs in (("held-out code", code), ("prose", prose))}

# %%
fig, ax = plt.subplots(1, 2, figsize=(13, 3.8))
L = cfg.num_moe_layers
for i, (name, c) in enumerate(conf.items()):
    pos = np.arange(L) + (i - 0.5) * 0.35
    parts = ax[0].violinplot([c[:, l] for l in range(L)], positions=pos, widths=0.3, showmeans=True)
    parts["bodies"][0].set_label(name)
ax[0].set(xlabel="MoE layer", ylabel="layer confidence C_l", title="layer confidence by domain")
ax[0].legend()

prompt = "class LRUCache:\n    def __init__(self, capacity):\n"
ids = model.encode(prompt)
base = rewire_jax.generate(model, [ids], max_new_tokens)
rew = rewire_jax.generate(model, [ids], max_new_tokens, rewire=RewireOptions(interval=interval))
ent_base = analysis.trace(model, ids + base.tokens[0]).entropy.mean(0)
ent_rew = analysis.trace(model, ids + rew.tokens[0], rew.deltas[0]).entropy.mean(0)
ax[1].plot(ent_base, label="baseline", alpha=0.8)
ax[1].plot(ent_rew, label="rewired (final deltas)", alpha=0.8)
ax[1].axvline(len(ids), color="k", ls=":", label="end of prompt")
ax[1].set(xlabel="token position", ylabel="router entropy (nats, mean over layers)", title="router entropy along a generation")
ax[1].legend()
plt.tight_layout()
plt.show()
for name, c in conf.items():
    print(f"{name:14s} mean C_l per layer:", c.mean(0).round(3))
