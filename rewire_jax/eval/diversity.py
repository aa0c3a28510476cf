"""Diversity of the k samples of a problem (paper App. C.3, Table 6), baseline vs rewired.

    tfidf_diversity(["def f(): return 1", "def f(): return 2"])   # -> float in [0, 1]
    per_problem(recs, tfidf_diversity)                            # problem_id -> diversity
    summary(recs, embed=load_embedder("models/codebert"))         # {"tfidf": {...}, "embedding": {...}}

Diversity of one problem = the mean over the k(k-1)/2 pairs of its samples of 1 - cosine similarity:
TF-IDF: vectors from scikit-learn's `TfidfVectorizer` with its defaults (lower-cased words of >= 2
word characters, smoothed idf, l2 norm), fitted on that problem's k samples only (lexical variation,
the paper's "cosine diversity"); embedding: the vectors of an `embed(texts) -> array` function, e.g.
a local sentence-transformers code model (the paper's "semantic diversity" used CodeBERT).
A method's value: mean ± standard deviation (ddof=0) over problems, as Table 6 reports it.
Two samples without any token count as identical (distance 0), one empty and one not as distance 1.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

Embed = Callable[[Sequence[str]], np.ndarray]


def _require_sklearn():
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as e:
        raise ImportError("TF-IDF diversity needs scikit-learn: pip install scikit-learn "
                          "(or pip install -e '.[eval]')") from e
    return TfidfVectorizer


def sklearn_available() -> bool:
    try:
        _require_sklearn()
    except ImportError:
        return False
    return True


def pairwise_cosine_diversity(vectors: np.ndarray) -> float:
    """Mean over pairs i < j of 1 - cos(v_i, v_j); zero vectors: see the module doc."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or len(v) < 2:
        raise ValueError(f"diversity needs at least 2 samples (rows), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    empty = norms == 0
    sim[np.ix_(empty, empty)] = 1.0           # two empty samples are the same text
    i, j = np.triu_indices(len(v), k=1)
    return float(np.mean(1.0 - sim[i, j]))


def tfidf_vectors(texts: Sequence[str]) -> np.ndarray:
    """TF-IDF rows of `texts`, fitted on `texts` (all-zero rows if no text has a token)."""
    vec = _require_sklearn()()
    try:
        return vec.fit_transform(list(texts)).toarray()
    except ValueError:   # "empty vocabulary": no sample has a token
        return np.zeros((len(texts), 1))


def tfidf_diversity(texts: Sequence[str]) -> float:
    return pairwise_cosine_diversity(tfidf_vectors(texts))


def embedding_diversity(texts: Sequence[str], embed: Embed) -> float:
    return pairwise_cosine_diversity(np.asarray(embed(list(texts))))


def load_embedder(path: str, device: Optional[str] = None) -> Embed:
    """`embed(texts)` from a sentence-transformers model in a LOCAL directory (never downloads)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"embedding model directory {path} does not exist (a local sentence-transformers "
                                f"model is needed; this harness never downloads one)")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("embedding diversity needs sentence-transformers: pip install sentence-transformers") from e
    model = SentenceTransformer(str(path), device=device, local_files_only=True)
    return lambda texts: model.encode(list(texts), convert_to_numpy=True)


def per_problem(recs: Iterable[dict], fn: Callable[[Sequence[str]], float]) -> dict:
    """problem_id -> fn(its completions, in sample order), for problems with >= 2 samples."""
    by = defaultdict(list)
    for r in recs:
        by[r["problem_id"]].append(r)
    return {pid: fn([r["completion"] for r in sorted(rs, key=lambda r: r["sample"])])
            for pid, rs in by.items() if len(rs) >= 2}


def _stats(values: dict) -> dict:
    v = np.array(list(values.values()), dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "problems": len(v)}


def summary(recs: Sequence[dict], embed: Optional[Embed] = None) -> dict:
    """{"tfidf": {"mean", "std", "problems"}, "embedding": {...} (only with `embed`)} of one
    (task, method) cell; {} when no problem has 2 samples."""
    recs = list(recs)
    tf = per_problem(recs, tfidf_diversity)
    if not tf:
        return {}
    out = {"tfidf": _stats(tf)}
    if embed is not None:
        out["embedding"] = _stats(per_problem(recs, lambda t: embedding_diversity(t, embed)))
    return out


def markdown(res: dict) -> list[str]:
    """Table 6: rows (task, method) of the cells that carry a "diversity" entry."""
    rows = [(t, m, c) for t in res["task_names"] for m, c in res["tasks"][t].items() if c.get("diversity")]
    if not rows:
        missing = any("diversity" in c for t in res["task_names"] for c in res["tasks"][t].values())
        return ["", "Sample diversity: not computed (pip install scikit-learn, then `rewire-jax eval report`)."] \
            if missing else []
    emb = any("embedding" in c["diversity"] for _, _, c in rows)
    fmt = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}" if d else ""
    out = ["", "## Sample diversity (Table 6: mean ± std over problems of the mean pairwise 1 - cosine similarity "
               "of a problem's k samples)", "",
           "| task | method | k | TF-IDF cosine div. |" + (" embedding div. |" if emb else ""),
           "|---|---|---|---|" + ("---|" if emb else "")]
    for t, m, c in rows:
        d = c["diversity"]
        out.append(f"| {t} | {m} | {c['samples_per_problem']} | {fmt(d['tfidf'])} |"
                   + (f" {fmt(d.get('embedding'))} |" if emb else ""))
    return out
