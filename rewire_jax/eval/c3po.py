"""C3PO (Li et al. 2025, arXiv 2504.07964) as a method of the harness: `c3po` / `c3po[k=v,...]`.

C3PO re-mixes a test prompt's expert pathway towards those of its "successful neighbours": prompts
of a reference set that the model answers correctly (built by `rewire-jax eval c3po-reference`,
rewire_jax/eval/c3po_reference.py). A *pathway* omega [L_crit, E] is the router's per-expert scores
(`routers.pathway_scores`: the softmax over all E experts; DeepSeek-V3: the sigmoid scores) of the
critical layers - the last `layers` (5) MoE layers - at the last prompt token. The reference
stores them for every MoE layer.

Two variants (`variant=`):
  paper     the rewiring paper's App. A.2 (kernel regression): the k nearest reference prompts by
            cosine similarity of the embeddings, kernel weights K_i (gaussian: exp(-|e_i - e|^2 /
            (2 bandwidth^2)) on unit-normalised embeddings, or cosine: the similarity itself),
            omega_hat = sum_i K_i omega_i / sum_i K_i (Eq. 8), and at the critical layers
            omega <- alpha * omega + (1 - alpha) * omega_hat (Eq. 9), applied at every token (prompt
            and generated: omega is then the token's own scores), with alpha picked from the grid
            `alphas` (default 0, 0.25, 0.5, 0.75, 1) by the lowest mean next-token NLL of the test
            prompt under the re-mixed routing (ties: the larger alpha). alpha = 1 is the baseline.
  released  what the C3PO code does: the 3 nearest by cosine similarity, weights = the similarities,
            no alpha: omega_hat *replaces* the router's scores at the critical layers at the last
            prompt token and at every generated token (the other prompt tokens route as usual).
In both, the re-mixed scores go through the router's own selection rule (top-k, renormalisation
where the router renormalises; `routers.route_scores`) inside the model (`model.moe.RouteOverride`).

The embedding (`embedder=`) is pluggable: `model` (default, offline): the model's own final hidden
state (after the final norm) mean-pooled over the prompt tokens; `st` / `st:NAME`: a
sentence-transformers model (default all-MiniLM-L6-v2, as the released code), imported only then.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("paper", "released")
KERNELS = ("gaussian", "cosine")
SCOPES = ("all", "last")
PAPER_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ST_DEFAULT = "all-MiniLM-L6-v2"
REFERENCE_FILE = "c3po_reference.npz"
REFERENCE_SUMMARY = "c3po_reference.json"


@dataclasses.dataclass(frozen=True)
class C3POOptions:
    """Options of the `c3po` method. Empty kernel / alphas / scope take the variant's default:
    paper -> gaussian, PAPER_ALPHAS, 'all'; released -> cosine, (0.0,), 'last'."""

    variant: str = "paper"      # 'paper' | 'released'
    k: int = 3                  # neighbours
    layers: int = 5             # critical layers: the last `layers` MoE layers
    kernel: str = ""            # 'gaussian' | 'cosine'
    bandwidth: float = 0.5      # gaussian kernel bandwidth (unit-normalised embeddings)
    alphas: tuple = ()          # the alpha grid (1 = the model's own routing)
    scope: str = ""             # 'all': every token; 'last': the last prompt token and every generated one
    embedder: str = "model"     # 'model' | 'st' | 'st:NAME'

    def __post_init__(self):
        released = self.variant == "released"
        if self.variant not in VARIANTS:
            raise ValueError(f"c3po variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        set_ = functools.partial(object.__setattr__, self)
        set_("kernel", self.kernel or ("cosine" if released else "gaussian"))
        set_("alphas", tuple(float(a) for a in self.alphas) or ((0.0,) if released else PAPER_ALPHAS))
        set_("scope", self.scope or ("last" if released else "all"))
        if self.kernel not in KERNELS:
            raise ValueError(f"c3po kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"c3po scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.k < 1 or self.layers < 1 or self.bandwidth <= 0:
            raise ValueError("c3po needs k >= 1, layers >= 1 and bandwidth > 0")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"c3po alphas must lie in [0, 1], got {self.alphas}")
        if len(self.alphas) > 1 and self.scope == "last":
            raise ValueError("choosing alpha by the prompt's loss needs scope=all (with scope=last the re-mixed "
                             "routing never reaches a prompt token the loss scores)")
        if not (self.embedder == "model" or self.embedder == "st" or self.embedder.startswith("st:")):
            raise ValueError(f"c3po embedder {self.embedder!r}; use 'model', 'st' or 'st:NAME'")


def parse_options(text: str) -> C3POOptions:
    """'variant=released,k=3' / 'alphas=0/0.5/1' -> C3POOptions (fields typed by their default)."""
    fields = {f.name: f for f in dataclasses.fields(C3POOptions)}
    kw = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in fields or not eq:
            raise ValueError(f"bad c3po option {item!r}; fields: {', '.join(fields)}")
        default = fields[key].default
        kw[key] = tuple(float(v) for v in value.split("/") if v.strip()) if key == "alphas" else type(default)(value)
    return C3POOptions(**kw)


# -- kernel regression (host-side numpy: a few vectors per prompt) ---------------------------------

def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def neighbours(query, refs, k: int):
    """query [D], refs [m, D] (unit-normalised) -> (indices [k'] nearest first, cosine similarities)."""
    sims = refs @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


def kernel_weights(sims, opts: C3POOptions) -> np.ndarray:
    """Cosine similarities of the neighbours -> kernel weights K_i."""
    sims = np.asarray(sims, np.float64)
    if opts.kernel == "gaussian":   # |a - b|^2 = 2 - 2 cos(a, b) for unit vectors
        return np.exp(-(2.0 - 2.0 * sims) / (2.0 * opts.bandwidth ** 2))
    return sims


def kernel_average(pathways, weights) -> Optional[np.ndarray]:
    """Eq. 8: sum_i K_i omega_i / sum_i K_i; None when the weights sum to <= 0 (no re-mixing)."""
    weights = np.asarray(weights, np.float64)
    total = weights.sum()
    if not total > 0:
        return None
    return np.tensordot(weights, np.asarray(pathways, np.float64), axes=1) / total


def remix(own, target, alpha: float):
    """Eq. 9 (what the model computes at each re-mixed token): alpha * omega + (1 - alpha) * omega_hat."""
    return alpha * np.asarray(own) + (1.0 - alpha) * np.asarray(target)


# -- the model's side: embeddings, pathways and prompt losses of a batch of prompts ----------------

@functools.partial(jax.jit, static_argnames=("cfg", "need_loss"))
def _prompt_pass(params, tokens, lengths, cfg, route, need_loss: bool):
    from ..model import layers as L
    from ..model import embed, head, positions_for, run_layers, sequence_losses, zero_deltas
    B, T = tokens.shape
    x, _, aux = run_layers(params, embed(params, tokens, cfg), positions_for(tokens), zero_deltas(cfg, B), cfg,
                           route=route)
    valid = (jnp.arange(T)[None] < lengths[:, None])[..., None]
    h = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps).astype(jnp.float32)
    emb = jnp.sum(jnp.where(valid, h, 0.0), axis=1) / lengths[:, None].astype(jnp.float32)
    last = aux["logits"][jnp.arange(B), :, lengths - 1]                       # [B, L_moe, E]
    loss = sequence_losses(head(params, x, cfg), tokens, lengths, "mean") if need_loss else None
    return emb, last, loss


def prompt_pass(model, ids: Sequence[Sequence[int]], route=None, need_loss: bool = False, batch_size: int = 8):
    """Teacher-forced prompts -> {'embedding' [n, d], 'pathway' [n, L_moe, E] (router scores at the
    last token), 'loss' [n] (mean next-token NLL; with need_loss)}. route: None or a
    RouteOverride of [n, ...] numpy arrays."""
    from ..model.moe import RouteOverride
    from ..model.routers import pathway_scores
    from ..rewire import bucket_length
    cfg = model.config
    out = {"embedding": [], "pathway": [], "loss": []}
    for lo in range(0, len(ids), batch_size):
        chunk = [list(t) for t in ids[lo:lo + batch_size]]
        rows = list(range(lo, lo + len(chunk))) + [lo] * (batch_size - len(chunk))   # pad: repeat the first
        chunk += [chunk[0]] * (batch_size - len(chunk))
        T = bucket_length(max(len(t) for t in chunk))
        tokens = np.zeros((batch_size, T), np.int32)
        for b, t in enumerate(chunk):
            tokens[b, :len(t)] = t
        lengths = np.array([len(t) for t in chunk], np.int32)
        r = None if route is None else RouteOverride(*(jnp.asarray(np.asarray(a)[rows]) for a in route))
        emb, last, loss = _prompt_pass(model.params, jnp.asarray(tokens), jnp.asarray(lengths), cfg, r, need_loss)
        n = min(batch_size, len(ids) - lo)
        out["embedding"].append(np.asarray(emb)[:n])
        out["pathway"].append(np.asarray(pathway_scores(last.reshape(-1, last.shape[-1]), cfg)
                                         ).reshape(last.shape)[:n])
        if need_loss:
            out["loss"].append(np.asarray(loss)[:n])
    return {k: np.concatenate(v) for k, v in out.items() if v}


Embedder = Callable[[Sequence[str], Sequence[Sequence[int]]], np.ndarray]   # (texts, token ids) -> [n, D]


def make_embedder(model, spec: str) -> Embedder:
    """'model': the model's mean-pooled final hidden state; 'st' / 'st:NAME': sentence-transformers."""
    if spec == "model":
        return lambda texts, ids: prompt_pass(model, ids)["embedding"]
    name = spec.partition(":")[2] or ST_DEFAULT
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(f"c3po embedder {spec!r} needs `pip install sentence-transformers` (and the "
                          f"{name} weights in its cache); embedder=model works offline") from e
    st = SentenceTransformer(name)
    return lambda texts, ids: np.asarray(st.encode(list(texts), convert_to_numpy=True))


# -- the reference set ----------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    """Prompts the model answered correctly, with their pathways at every MoE layer."""

    pathways: np.ndarray          # [m, L_moe, E] fp32
    ids: list                     # token ids per prompt (as the model read them)
    texts: list                   # prompt texts (before any chat template)
    problem_ids: list
    meta: dict                    # model, task, source task, source, chat, router kind, ...

    def save(self, out_dir) -> Path:
        """Write out_dir/c3po_reference.npz (everything; what `load` reads) and a readable
        c3po_reference.json, each atomically (a temporary file renamed over the target)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"meta": self.meta, "ids": self.ids, "texts": self.texts, "problem_ids": self.problem_ids})
        _atomic_write(out_dir / REFERENCE_FILE, lambda f: np.savez(f, pathways=self.pathways.astype(np.float32),
                                                                   json=np.array(blob)))
        summary = dict(self.meta, count=len(self.ids), problem_ids=self.problem_ids)
        _atomic_write(out_dir / REFERENCE_SUMMARY, lambda f: f.write(json.dumps(summary, indent=1).encode()))
        return out_dir / REFERENCE_FILE

    @classmethod
    def load(cls, path) -> "Reference":
        path = Path(path)
        if path.is_dir():
            path = path / REFERENCE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no C3PO reference set at {path}; build one with `rewire-jax eval c3po-reference`")
        with np.load(path) as z:
            d = json.loads(str(z["json"]))
            return cls(np.asarray(z["pathways"]), d["ids"], d["texts"], d["problem_ids"], d["meta"])


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- test time ------------------------------------------------------------------------------------

class C3PO:
    """Re-mixed routing for test prompts from one reference set (one model, one task)."""

    def __init__(self, model, reference: Reference, opts: C3POOptions, embedder: Optional[Embedder] = None,
                 batch_size: int = 8):
        cfg = model.config
        if reference.pathways.shape[1:] != cfg.delta_shape:
            raise ValueError(f"the C3PO reference holds pathways of shape {reference.pathways.shape[1:]}; this "
                             f"model routes {cfg.delta_shape} (L_moe, E): build the reference with the same model")
        if not len(reference.ids):
            raise ValueError("the C3PO reference set is empty (no correct answers on its source)")
        self.model, self.ref, self.opts, self.batch_size = model, reference, opts, batch_size
        self.crit = np.arange(cfg.num_moe_layers)[-opts.layers:]               # critical MoE rows
        self.embed = embedder or make_embedder(model, opts.embedder)
        self.ref_emb = unit(self.embed(reference.texts, reference.ids))

    def plan(self, texts: Sequence[str], ids: Sequence[Sequence[int]]):
        """-> (RouteOverride of [n, ...] numpy arrays, per prompt info dicts: neighbours, weights,
        alpha, prompt losses per alpha, the extra FLOPs spent)."""
        from ..model.moe import RouteOverride
        from .backend import forward_flops
        cfg, opts = self.model.config, self.opts
        n, L, E = len(ids), cfg.num_moe_layers, cfg.num_experts
        emb = unit(self.embed(texts, ids))
        target = np.zeros((n, L, E), np.float32)
        alpha = np.ones((n, L), np.float32)
        start = np.array([0 if opts.scope == "all" else len(t) - 1 for t in ids], np.int32)
        infos, remixed = [], np.zeros(n, bool)
        for i in range(n):
            idx, sims = neighbours(emb[i], self.ref_emb, opts.k)
            w = kernel_weights(sims, opts)
            avg = kernel_average(self.ref.pathways[idx][:, self.crit], w)
            if avg is not None:
                target[i, self.crit] = avg
                remixed[i] = True
            infos.append({"neighbours": [self.ref.problem_ids[j] for j in idx], "similarity": sims.tolist(),
                          "kernel": w.tolist(), "alpha": 1.0 if avg is None else opts.alphas[0]})
        alphas = sorted(opts.alphas, reverse=True)      # ties go to the larger alpha (closer to the baseline)
        if len(alphas) > 1:
            losses = []
            for a in alphas:
                al = alpha.copy()
                al[np.ix_(remixed, self.crit)] = a
                losses.append(prompt_pass(self.model, ids, RouteOverride(target, al, start), True,
                                          self.batch_size)["loss"])
            losses = np.stack(losses)                   # [n_alpha, n]
            for i in np.flatnonzero(remixed):
                infos[i]["alpha"] = alphas[int(np.argmin(losses[:, i]))]
                infos[i]["losses"] = {str(a): float(v) for a, v in zip(alphas, losses[:, i])}
        for i in np.flatnonzero(remixed):
            alpha[i, self.crit] = infos[i]["alpha"]
        passes = (opts.embedder == "model") + (len(alphas) if len(alphas) > 1 else 0)
        for i, t in enumerate(ids):
            infos[i]["flops"] = passes * forward_flops(cfg, len(t))
        return RouteOverride(target, alpha, start), infos


def reference_dir(spec: Optional[dict], task: str) -> str:
    """--c3po-reference: {task: DIR} (or {'*': DIR} for every task) -> this task's directory."""
    spec = spec or {}
    d = spec.get(task) or spec.get("*")
    if not d:
        raise ValueError(f"method c3po on task {task} needs a reference set: --c3po-reference DIR or "
                         f"{task}=DIR (built by `rewire-jax eval c3po-reference --task {task}`)")
    return d


def plan_requests(model, opts: C3POOptions, task: str, ref_spec: Optional[dict], texts, reqs, samples: int,
                  cache: dict):
    """The runner's hook: the routing override of a batch of requests (`samples` consecutive
    requests per prompt) and the per-prompt info. cache: engines kept across batches of a run."""
    t0 = time.perf_counter()
    key = (task, reference_dir(ref_spec, task), opts)
    if key not in cache:   # (the reference embeddings: once per run, not counted per sample)
        cache[key] = C3PO(model, Reference.load(key[1]), opts)
        t0 = time.perf_counter()
    route, infos = cache[key].plan(texts, [r.ids for r in reqs[::samples]])
    for info in infos:
        info["seconds"] = (time.perf_counter() - t0) / len(infos)
    return type(route)(*(np.repeat(a, samples, axis=0) for a in route)), infos


def annotate(records: list, infos: list, samples: int) -> None:
    """Each record of a prompt gets its C3PO info and its share of the extra FLOPs and seconds."""
    for j, r in enumerate(records):
        info = infos[j // samples]
        r["c3po"] = {k: v for k, v in info.items() if k not in ("flops", "seconds")}
        r["flops"] = r["flops"] + info["flops"] / samples
        r["seconds"] = r["seconds"] + info["seconds"] / samples
