# %% [markdown]
# # Quickstart: rewired generation on the demo model
#
# Load the bundled demo model (a small OLMoE trained by this project on the Python standard
# library), generate a continuation with and without test-time rerouting, and look at what each
# optimisation phase did to the loss on the context. The sizes are the next cell's (tagged
# `parameters`: `tests/test_notebooks.py` runs the notebook with smaller ones put after it).

# %% tags=["parameters"]
max_new_tokens = 128   # tokens generated, baseline and rewired
interval = 32          # re-optimise every `interval` generated tokens

# %%
import matplotlib.pyplot as plt
import numpy as np

import rewire_jax
from rewire_jax import RewireOptions
from rewire_jax.cli import DEMO_MODEL

model = rewire_jax.load(DEMO_MODEL)
print(model.config.model_type, "layers:", model.config.num_layers, "experts:", model.config.num_experts,
      "top-k:", model.config.num_experts_per_tok)

# %%
prompt = "import os\n\n\ndef walk_files(root):\n    \"\"\"Yield every file below root.\"\"\"\n"
opts = RewireOptions(interval=interval)  # paper defaults, re-optimising every `interval` (32) tokens
baseline = rewire_jax.generate(model, [prompt], max_new_tokens)
rewired = rewire_jax.generate(model, [prompt], max_new_tokens, rewire=opts)
print("----- baseline -----\n" + prompt + baseline.texts[0])
print("----- rewired ------\n" + prompt + rewired.texts[0])

# %% [markdown]
# Each phase takes `steps` Adam steps on the router deltas; `loss_before` is the context loss at
# its first step, `loss_after` the loss under the updated deltas (from the re-prefill).

# %%
ph = rewired.phase_dicts()
x = [p["context_len"] for p in ph]
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(x, [p["loss_before"] for p in ph], "o-", label="before phase")
ax[0].plot(x, [p["loss_after"] for p in ph], "s-", label="after phase")
ax[0].set(xlabel="context length (tokens)", ylabel="context NLL (nats/token)", title="per-phase loss")
ax[0].legend()
im = ax[1].imshow(np.array([p["weights"] for p in ph]).T, aspect="auto", cmap="viridis")
ax[1].set(xlabel="phase", ylabel="MoE layer", title="soft layer weights w_l",
          xticks=range(len(ph)), yticks=range(model.config.num_moe_layers))
fig.colorbar(im, ax=ax[1])
plt.tight_layout()
plt.show()

# %%
print("timing (s):", {k: round(v, 2) for k, v in rewired.timing.items()})
print("final |delta| per layer:", np.abs(rewired.deltas[0]).max(-1).round(3))
