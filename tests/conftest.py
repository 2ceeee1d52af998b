"""Shared fixtures: small configs and the path to the optional ML-1M copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
ML1M = ROOT.parent / "shared" / "data" / "ml-1m" / "ml-1m.txt.gz"


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A fast tiny run: small synthetic data, few epochs."""
    return ["data.synthetic_users=300", "data.synthetic_items=100", "train.max_epochs=2",
            "train.batch_size=64", "model.max_len=16"]
