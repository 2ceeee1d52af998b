"""Where the benchmark scripts find the repository and the MovieLens-1M copy (never committed)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML1M = ROOT.parent / "shared" / "data" / "ml-1m" / "ml-1m.txt.gz"


def ml1m_default() -> str:
    """`--data`'s default: $ML1M if set, else the shared copy beside the repository."""
    return os.environ.get("ML1M", str(ML1M))
