"""Where the factory keeps things: one object, read from the environment once per command.

FACTORY_DATA_DIR (datasets/: records, quarantine, catalog, dataset versions), FACTORY_REGISTRY_DIR
(registry/: the embedded MLflow store, training folders, routes), FACTORY_REPORTS_DIR (reports/).
The converted base model and other caches live under FACTORY_CACHE_DIR (`base_model.cache_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    data: Path
    registry: Path
    reports: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("FACTORY_DATA_DIR", "datasets")),
                   Path(os.environ.get("FACTORY_REGISTRY_DIR", "registry")),
                   Path(os.environ.get("FACTORY_REPORTS_DIR", "reports")))
