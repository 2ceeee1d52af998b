"""Ray Train: the per-worker loop under TorchTrainer with 2 CPU workers (gloo)."""

import json

import pytest

from tuner.config import load_config
from tuner.train.driver import fit

# timing and memory differ per process; every model and metric value must agree
PER_PROCESS = {"samples_per_s", "peak_mem_mb", "wall_s"}


@pytest.mark.slow
def test_two_workers_report_identical_metrics(tmp_path):
    cfg = load_config(overrides=["data.synthetic_users=400", "data.synthetic_items=100", "train.max_epochs=2",
                                 "train.batch_size=32", "model.max_len=16", "resources.workers=2"])
    final = fit(cfg, quiet=True, storage=str(tmp_path))
    ranks = [json.loads((tmp_path / "train-tiny" / "final" / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == final
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        if key not in PER_PROCESS:
            assert ranks[0][key] == ranks[1][key], key
    assert final["epochs"] == 2 and final["test_hr_10"] > 0
