"""Data prep for the explorer page (no gradio here)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class LibraryAnalysis:
    """What the Library tab shows for one library: the MBC map, the similarity matrix and the experts table."""

    name: str
    tasks: list[str] = field(default_factory=list)  # one entry per warm-up adapter, map order
    coords: np.ndarray | None = None  # (tasks, 2) stored 2-D map coordinates
    similarity: np.ndarray | None = None  # (tasks, tasks) cosine similarity
    cluster_of: dict[str, str] = field(default_factory=dict)  # task -> MBC cluster
    experts: pd.DataFrame = field(default_factory=pd.DataFrame)
    note: str = ""  # shown instead of the map when there is no MBC data
