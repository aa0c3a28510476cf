# %% [markdown]
# # Sweeps: interval m and steps n (paper Fig. 6), and the ablation table (Table 2)
#
# Continuation NLL on held-out stdlib modules (teacher-forced, see
# `python -m rewire_jax.experiments.heldout_nll`), for a grid of re-optimisation intervals and Adam
# steps, and the layer-selection ablations. Small document counts keep this notebook to a few
# minutes on a CPU; the experiment module runs the full version. The sizes are the next cell's
# (tagged `parameters`: `tests/test_notebooks.py` runs the notebook with smaller ones put after it).

# %% tags=["parameters"]
PREFIX, CONT = 128, 64                     # tokens per document: the prefix optimised on, the continuation scored
max_docs = 8                               # documents per set
intervals, steps = [16, 64], [1, 5, 10]    # the grid: re-optimisation interval m, Adam steps per phase n
table_interval, table_steps = 32, 5        # m and n of the ablation table

# %%
import matplotlib.pyplot as plt
import numpy as np

import rewire_jax
from rewire_jax import RewireOptions
from rewire_jax.cli import DEMO_MODEL
from rewire_jax.experiments import heldout_nll as E

model = rewire_jax.load(DEMO_MODEL)
sets = E.document_sets(model, PREFIX, CONT, max_docs=max_docs)
docs = sets["held-out stdlib code"]
base = E.evaluate(model, docs, PREFIX, CONT, None)
print("baseline continuation NLL: %.4f" % base.mean())

# %%
grid = np.array([[np.mean(E.evaluate(model, docs, PREFIX, m, RewireOptions(steps=n, interval=m)) - base)
                  for n in steps] for m in intervals])
fig, ax = plt.subplots(figsize=(6, 3.6))
for i, m in enumerate(intervals):
    ax.plot(steps, grid[i], "o-", label=f"m = {m}")
ax.axhline(0, color="k", lw=0.8)
ax.set(xlabel="Adam steps per phase (n)", ylabel="Δ NLL vs baseline (nats/token)", title="interval and steps")
ax.legend()
plt.tight_layout()
plt.show()

# %%
results = E.run(model, sets, PREFIX, table_interval, table_steps, 0.05, log=lambda *_: None)
print(E.table(results, list(sets)))
