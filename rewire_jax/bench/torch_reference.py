"""Independent PyTorch oracle for test-time rerouting ("rewiring") on HuggingFace MoE models.

This file is deliberately written straight from docs/rewiring-algorithm.md, sharing no code with the
JAX implementation, so that agreement between the two is evidence rather than tautology.  It favours
obviousness over speed: no KV cache, a full forward per generated token, batch size 1, fp32 only.

How the delta reaches the router: every HF MoE router in transformers 5.23 computes its logits with
`F.linear(h, self.weight[, self.bias])`, where `F` is the `torch.nn.functional` *module*, so the
attribute is looked up at call time and can be monkeypatched.  We replace it, inside
`deltas_injected`, with a wrapper that adds `delta[l]` when the weight is layer l's router weight
(matched by storage pointer).  The addition therefore lands after the gpt-oss router bias and before
every softmax / top-k, and it is also what HF records as `router_logits` (OutputRecorder index 0 of
the router module), so the returned logits include the delta.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

SELECTIONS = ("soft", "hard", "reverse", "all", "random", "last_k", "none")


# --------------------------------------------------------------------------- routers and injection


def _router_submodules(hf_model):
    """[(decoder_layer_index, router_module)] for every MoE layer, in layer order.

    Dense MLPs name their projections gate_proj/up_proj, so an `mlp.gate` / `mlp.router` attribute
    with a 2-D weight is always a router.  Qwen2-MoE's scalar `shared_expert_gate` has a different
    name and is (correctly) never touched.
    """
    found = []
    for i, layer in enumerate(hf_model.model.layers):
        mlp = getattr(layer, "mlp", None)
        for name in ("gate", "router"):
            mod = getattr(mlp, name, None)
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                found.append((i, mod))
                break
    return found


def router_modules(hf_model):
    """[(decoder_layer_index, router_weight_parameter)] for every MoE layer (dense layers skipped)."""
    return [(i, mod.weight) for i, mod in _router_submodules(hf_model)]


@contextlib.contextmanager
def deltas_injected(hf_model, deltas):
    """Add deltas[l] (a tensor [L_moe, E] or a sequence of [E] tensors) to MoE layer l's router logits.

    Gradients flow into `deltas` if they require grad.  Works for fp32 models; a router that casts its
    weight to another dtype (DeepSeek with a bf16 model) would get a new storage and silently miss the
    delta, so every router call is checked to have actually hit the patched linear.
    """
    routers = _router_submodules(hf_model)
    if len(deltas) != len(routers):
        raise ValueError(f"got {len(deltas)} delta rows for {len(routers)} MoE layers")
    by_ptr = {mod.weight.data_ptr(): l for l, (_, mod) in enumerate(routers)}
    original_linear = F.linear
    hits = [0] * len(routers)

    def patched_linear(input, weight, bias=None):
        out = original_linear(input, weight, bias)
        l = by_ptr.get(weight.data_ptr())
        if l is None:
            return out
        hits[l] += 1
        return out + deltas[l].to(out.dtype)

    def make_check(l):
        # Pre-hook snapshots the hit counter; post-hook demands exactly one new hit.
        state = {}

        def pre(_mod, _args):
            state["before"] = hits[l]

        def post(_mod, _args, _out):
            if hits[l] != state["before"] + 1:
                raise RuntimeError(f"router of MoE layer {l} did not go through the patched F.linear")

        return pre, post

    handles = []
    for l, (_, mod) in enumerate(routers):
        pre, post = make_check(l)
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    torch.nn.functional.linear = patched_linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original_linear
        for h in handles:
            h.remove()


def hf_logits(hf_model, ids, deltas=None):
    """Logits [B, T, V] (numpy) of the HF model on token ids [B, T], with deltas [L_moe, E] added to
    the router logits (`deltas_injected`) when given."""
    with torch.no_grad():
        if deltas is None:
            return hf_model(torch.tensor(ids)).logits.numpy()
        with deltas_injected(hf_model, torch.tensor(np.asarray(deltas), dtype=torch.float32)):
            return hf_model(torch.tensor(ids)).logits.numpy()


# --------------------------------------------------------------------------- pieces of a phase


def _forward(hf_model, ids, deltas):
    """Full forward on one unpadded sequence: (logits [T, V], [(router_logits [T, E], chosen [T, k])]).

    `chosen` are the expert indices the model itself selected (every transformers 5.23 router
    returns (logits, weights, indices)); recorded with forward hooks, so the layer scores use the
    model's own choice for every router: group-limited (DeepSeek-V2 group_limited_greedy, V3
    noaux_tc with its correction bias) and gpt-oss's top-k on logits alike.
    """
    chosen = {}
    hooks = [mod.register_forward_hook(lambda _m, _a, out, l=l: chosen.__setitem__(l, out[2].detach()))
             for l, (_, mod) in enumerate(_router_submodules(hf_model))]
    try:
        with deltas_injected(hf_model, deltas):
            out = hf_model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0], [(z, chosen[l]) for l, z in enumerate(out.router_logits)]


def _lm_loss(logits, ids, loss):
    """Next-token cross-entropy over the T-1 targets of the context."""
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction=loss)


def _layer_scores(routing):
    """C_l = mean over tokens of -(1/k) * sum_{j in model's chosen k} log softmax(z~)_j  (Eq. 2-3).

    The softmax runs over all E routed logits (gpt-oss / Mixtral / DeepSeek-V3 included, whose
    models never compute it); the log-probs in float64.
    """
    scores = []
    for z, idx in routing:
        logp = torch.log_softmax(z.detach().double(), dim=-1).gather(-1, idx.long())
        scores.append(float((-logp.mean(dim=-1)).mean()))
    return np.asarray(scores, dtype=np.float64)


def _select(scores, selection, ratio, last_k, seed, phase_index):
    """(weights [L], selected mask [L]) for one phase; weights are fixed for the whole phase."""
    L = len(scores)
    k_sel = max(1, int(np.floor(ratio * L)))
    sel = np.zeros(L, dtype=bool)
    if selection == "soft":
        return scores / scores.sum(), np.ones(L, dtype=bool)
    if selection == "all":
        sel[:] = True
    elif selection == "hard":  # highest scores, ties to the lower layer index
        sel[sorted(range(L), key=lambda l: (-scores[l], l))[:k_sel]] = True
    elif selection == "reverse":  # lowest scores, ties to the lower layer index
        sel[sorted(range(L), key=lambda l: (scores[l], l))[:k_sel]] = True
    elif selection == "random":
        sel[sorted(np.random.default_rng([seed, phase_index]).permutation(L)[:k_sel])] = True
    elif selection == "last_k":
        sel[L - min(last_k, L):] = True
    else:
        raise ValueError(f"unknown selection {selection!r}")
    return sel.astype(np.float64), sel


def _new_adam(deltas, lr, eps, weight_decay):
    # One param group per layer so that soft_mode="lr" can give each layer its own learning rate.
    return torch.optim.Adam([{"params": [d]} for d in deltas], lr=lr, betas=(0.9, 0.999), eps=eps,
                            weight_decay=weight_decay)


def _phase(hf_model, ctx, deltas, opt, *, steps, lr, selection, ratio, soft_mode, confidence, loss,
           last_k, seed, phase_index):
    """`steps` Adam steps on the context; returns the phase record."""
    weights = selected = scores = None
    loss_before = None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        logits, routing = _forward(hf_model, ctx, deltas)
        value = _lm_loss(logits, ctx, loss)
        if step == 0:
            # Scores/weights come from the first step's forward (current deltas) and stay fixed.
            loss_before = float(value.detach())
            C = _layer_scores(routing)
            scores = C if confidence == "paper" else 1.0 / C
            weights, selected = _select(scores, selection, ratio, last_k, seed, phase_index)
            for l, group in enumerate(opt.param_groups):
                group["lr"] = lr * weights[l] if (selection == "soft" and soft_mode == "lr") else lr
        value.backward()
        for l, d in enumerate(deltas):
            if not selected[l]:
                d.grad = None  # torch Adam skips grad-None params: no moments, no step count, no decay
            elif selection == "soft" and soft_mode == "grad":
                d.grad.mul_(float(weights[l]))  # Eq. 7 literally
        opt.step()
    with torch.no_grad():
        logits, _ = _forward(hf_model, ctx, deltas)
        loss_after = float(_lm_loss(logits, ctx, loss))
    return {"context_len": len(ctx), "loss_before": loss_before, "loss_after": loss_after,
            "scores": scores, "weights": weights}


# --------------------------------------------------------------------------- the full loop


def reference_generate(hf_model, prompt_ids: list[int], max_new_tokens: int, *, steps=5, interval=128,
                       lr=0.05, weight_decay=1e-8, eps=1e-5, selection="soft", ratio=0.5, soft_mode="lr",
                       confidence="paper", loss="mean", persist_optimizer=True, continuous=True, last_k=5,
                       seed=0, eos_token_id=None) -> dict:
    """Greedy generation with test-time router-logit deltas (phase 1 / phase 2 alternation).

    Returns {"tokens": new tokens (EOS included if hit), "deltas": float32 [L_moe, E] (final),
             "phases": [{"context_len", "loss_before", "loss_after", "scores" [L_moe], "weights" [L_moe]}]}.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}")
    if soft_mode not in ("lr", "grad") or confidence not in ("paper", "inverse") or loss not in ("mean", "sum"):
        raise ValueError("bad soft_mode / confidence / loss")
    prompt_ids = [int(t) for t in prompt_ids]
    routers = router_modules(hf_model)
    n_experts = routers[0][1].shape[0]

    # Freeze the model for the duration only (restored afterwards: other tests share the model).
    was_training = hf_model.training
    old_flags = [p.requires_grad for p in hf_model.parameters()]
    hf_model.eval()
    hf_model.requires_grad_(False)
    try:
        deltas = [torch.nn.Parameter(torch.zeros(n_experts, dtype=torch.float32)) for _ in routers]
        opt = _new_adam(deltas, lr, eps, weight_decay)
        phase_kw = dict(steps=steps, lr=lr, selection=selection, ratio=ratio, soft_mode=soft_mode,
                        confidence=confidence, loss=loss, last_k=last_k, seed=seed)
        ctx, new, phases = list(prompt_ids), [], []

        def run_phase():
            nonlocal opt
            if not persist_optimizer and phases:
                opt = _new_adam(deltas, lr, eps, weight_decay)
            phases.append(_phase(hf_model, ctx, deltas, opt, phase_index=len(phases), **phase_kw))

        if selection != "none":
            run_phase()
        finished = max_new_tokens <= 0
        while not finished:
            # Phase 2: up to `interval` greedy tokens, full re-forward each time with current deltas.
            for _ in range(min(interval, max_new_tokens - len(new))):
                with torch.no_grad():
                    logits, _ = _forward(hf_model, ctx, deltas)
                tok = int(torch.argmax(logits[-1]))
                ctx.append(tok)
                new.append(tok)
                if eos_token_id is not None and tok == eos_token_id:
                    finished = True
                    break
            finished = finished or len(new) >= max_new_tokens
            if not finished and continuous and selection != "none":
                run_phase()  # Phase 1 again, on prompt + everything generated so far
        final = torch.stack([d.detach() for d in deltas]).numpy().copy()
    finally:
        for p, flag in zip(hf_model.parameters(), old_flags):
            p.requires_grad_(flag)
        hf_model.train(was_training)
    return {"tokens": new, "deltas": final, "phases": phases}
