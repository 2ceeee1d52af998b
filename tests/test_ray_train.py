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


@pytest.mark.slow
def test_corrupted_train_checkpoint_falls_back_to_the_older_one(tmp_path, capfd):
    cfg = load_config(overrides=["data.synthetic_users=300", "data.synthetic_items=80", "train.max_epochs=2",
                                 "train.batch_size=32", "model.max_len=16", "train.patience=0"])
    fit(cfg, quiet=True, storage=str(tmp_path))
    checkpoints = sorted(p for p in (tmp_path / "train-tiny").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    (checkpoints[-1] / "state.pt").write_bytes(b"not a checkpoint")  # the epoch-2 file is damaged
    cfg.train.max_epochs = 3
    final = fit(cfg, quiet=True, storage=str(tmp_path))  # same run: Train resumes it
    assert final["epochs"] == 3  # epoch 2 redone from the epoch-1 checkpoint, then epoch 3
    assert "resuming from the older checkpoint" in capfd.readouterr().err
