# %% [markdown]
# # Extending the model with Flax: inspect a router, swap in your own
#
# Every architecture is a tree of `flax.nnx` modules (`rewire_jax.modules`): `CausalLM` ->
# `stacks[s][j]` (`DecoderLayer`, holding the weights of all repeats of a stack) -> `attn`
# (`GQAttention` / `MLAttention`) and `mlp` (`MoEBlock` with its routing rule `routing`, a
# `Router`, or `DenseMLP`). The deltas are an argument of the call, never module state.
#
# This notebook prints the module tree of the bundled demo model, looks at one MoE layer's router
# probabilities on a prompt, replaces every router by a subclass that divides the router logits by
# a temperature, and compares baseline / rewired generations of the stock and the modified model.
# The modified model goes through the same `generate` (and `rewirer`, queue, eval harness) as the
# stock one: `model.with_module(module)` carries the module graph in the model's config. The sizes
# are the next cell's (tagged `parameters`: `tests/test_notebooks.py` runs the notebook with smaller
# ones put after it).

# %% tags=["parameters"]
max_new_tokens = 96    # tokens generated per run (stock / tempered, baseline / rewired)
interval = 32          # re-optimise every `interval` generated tokens

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import rewire_jax
from rewire_jax import modules
from rewire_jax.cli import DEMO_MODEL

model = rewire_jax.load(DEMO_MODEL)
lm = model.module          # a CausalLM over the loaded arrays (no copies)


def show(module):
    """One line per module: path, class, its Params' shapes (static settings left out)."""
    for path, m in reversed(list(nnx.iter_modules(module))):   # root first
        shapes = {k: tuple(v.shape) for k, v in vars(m).items() if isinstance(v, nnx.Param)}
        print(f"{'/'.join(map(str, path)) or '(root)':22s} {type(m).__name__:13s}",
              " ".join(f"{k}{list(s)}" for k, s in shapes.items()))


show(lm)

# %% [markdown]
# The Param state of the module is the model's param tree (same paths, same arrays), so HF export,
# converted checkpoints and sharding all read one tree. Each Param carries its logical axes.

# %%
state = nnx.state(lm, nnx.Param)
print(jax.tree.map(jnp.shape, nnx.to_pure_dict(state))["stacks"]["0"]["0"]["mlp"])
print("router weight axes:", lm.stacks["0"]["0"].mlp.router.get_metadata()["out_sharding"])
prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
tokens = jnp.asarray(model.encode(prompt))[None]
logits = lm(tokens)                      # [1, T, V] fp32, the same as rewire_jax.forward
print("next token:", repr(model.decode([int(logits[0, -1].argmax())])))

# %% [markdown]
# ## One MoE layer's router probabilities
# `forward` also returns the router logits of every MoE layer (delta included). The softmax over
# the 16 experts of the last MoE layer, per prompt token:

# %%
fwd = jax.jit(rewire_jax.forward, static_argnames="cfg")
_, aux = fwd(model.params, tokens, rewire_jax.zero_deltas(model.config, 1), model.config)
layer = model.config.num_moe_layers - 1
probs = np.asarray(jax.nn.softmax(aux["logits"][0, layer], axis=-1))       # [T, E]
fig, ax = plt.subplots(figsize=(8, 3.5))
im = ax.imshow(probs.T, aspect="auto", cmap="viridis")
ax.set(xlabel="prompt token", ylabel="expert", title=f"router probabilities, MoE layer {layer}")
fig.colorbar(im, ax=ax)
plt.show()


# %% [markdown]
# ## A custom router
# A subclass of the stock router (`SoftmaxTopK` for OLMoE-style models) that routes on
# z~ / temperature. z~ already includes the delta, so the rewiring still moves it. Put one on every
# MoE block of the module and make a model of it; the stock `model` is left as it was.

# %%
class TemperedSoftmaxTopK(modules.SoftmaxTopK):
    def __init__(self, k, norm_topk_prob=False, scaling=1.0, temperature=1.0):
        super().__init__(k, norm_topk_prob, scaling)
        self.temperature = temperature

    def __call__(self, logits, correction_bias=None):
        return super().__call__(logits / self.temperature, correction_bias)


custom = model.module
for block in custom.moe_blocks():
    r = block.routing
    block.routing = TemperedSoftmaxTopK(r.k, r.norm_topk_prob, r.scaling, temperature=0.25)
tempered = model.with_module(custom)
print("tempered:", type(tempered.module.stacks["0"]["0"].mlp.routing).__name__,
      "temperature", tempered.module.stacks["0"]["0"].mlp.routing.temperature)
print("stock router still:", type(model.module.stacks["0"]["0"].mlp.routing).__name__)

# %% [markdown]
# ## Baseline and rewired generations, stock and tempered
# Greedy, `max_new_tokens` (96) new tokens, rewiring every `interval` (32) tokens (5 Adam steps per
# phase).

# %%
opts = rewire_jax.RewireOptions(interval=interval)
runs = {}
for name, m in (("stock", model), ("tempered", tempered)):
    runs[name, "baseline"] = rewire_jax.generate(m, prompt, max_new_tokens=max_new_tokens)
    runs[name, "rewired"] = rewire_jax.generate(m, prompt, max_new_tokens=max_new_tokens, rewire=opts)
for (name, mode), r in runs.items():
    print(f"--- {name} / {mode}\n{prompt}{r.texts[0]}\n")

# %% [markdown]
# The rewired runs' phases: the context loss before and after each optimisation phase, and the
# NLL of each continuation under its own model with zero deltas.

# %%
def nll(m, text_tokens):
    seq = jnp.asarray(model.encode(prompt) + list(text_tokens))[None]
    logits, _ = fwd(m.params, seq, rewire_jax.zero_deltas(m.config, 1), m.config)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    tok = seq[0, 1:]
    n0 = len(model.encode(prompt)) - 1
    return float(-jnp.mean(jnp.take_along_axis(logp, tok[:, None], axis=-1)[n0:]))


fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
for name, m in (("stock", model), ("tempered", tempered)):
    ph = runs[name, "rewired"].phase_dicts()
    ctx = [p["context_len"] for p in ph]
    ax[0].plot(ctx, [p["loss_before"] for p in ph], "o--", label=f"{name}: before")
    ax[0].plot(ctx, [p["loss_after"] for p in ph], "o-", label=f"{name}: after")
ax[0].set(xlabel="context length", ylabel="context loss", title="optimisation phases")
ax[0].legend()
names = [f"{n}\n{mode}" for n, mode in runs]
ax[1].bar(names, [nll(model if n == "stock" else tempered, r.tokens[0]) for (n, _), r in runs.items()])
ax[1].set(ylabel="NLL of the continuation", title="continuation NLL (zero deltas)")
plt.tight_layout()
plt.show()
