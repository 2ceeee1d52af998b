"""Ray Train: the per-worker loop under TorchTrainer with 2 CPU workers (gloo)."""

import json
import tempfile
from pathlib import Path

import pytest

from tuner.config import load_config
from tuner.errors import UserError
from tuner.train.driver import fit

# timing and memory differ per process; every model and metric value must agree
PER_PROCESS = {"samples_per_s", "peak_mem_mb", "wall_s"}


@pytest.mark.slow
@pytest.mark.parametrize("precision", [
    [],
    # what a GPU cluster runs by default at 430M: bf16 weights, split fp32 masters kept by each rank's
    # optimizer, bf16 gradients averaged by DDP (gloo here) and a bf16 residual stream
    ["train.amp=bf16", "train.weights=bf16", "optim.masters=split", "model.residual=bf16"],
], ids=["fp32", "bf16_weights"])
def test_two_workers_report_identical_metrics(tmp_path, precision):
    cfg = load_config(overrides=["data.synthetic_users=400", "data.synthetic_items=100", "train.max_epochs=2",
                                 "train.batch_size=32", "model.max_len=16", "resources.workers=2", *precision])
    final = fit(cfg, quiet=True, storage=str(tmp_path))
    ranks = [json.loads((tmp_path / "train-tiny" / "final" / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == final
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        if key not in PER_PROCESS:
            assert ranks[0][key] == ranks[1][key], key
    assert final["epochs"] == 2 and final["test_hr_10"] > 0
    # the metrics above are all-reduced, so they agree whatever the ranks hold; this compares weights
    assert final["ranks_agree"] == 1.0


@pytest.mark.slow
def test_global_batch_scope_makes_the_steps_of_one_worker(tmp_path):
    """train.batch_scope=global: two workers take half the batch each, so the run makes as many
    optimizer steps as one worker with the whole batch (worker scope: about half as many)."""
    from tuner.train.loop import train_worker
    from tuner.train.parallel import local_context
    from tuner.train.reporting import ConsoleReporter

    base = ["data.synthetic_users=400", "data.synthetic_items=100", "train.max_epochs=2", "train.batch_size=32",
            "model.max_len=16"]
    one = load_config(overrides=base)
    single = train_worker(one, local_context(one.train), ConsoleReporter(enabled=False))
    two = fit(load_config(overrides=base + ["resources.workers=2", "train.batch_scope=global"]), quiet=True,
              storage=str(tmp_path))
    assert two["steps"] == single["steps"] == 2 * 13  # 400 users in batches of 32: 13 a epoch
    assert two["ranks_agree"] == 1.0


def test_weights_digest_and_agreement_see_one_bit_of_difference():
    import copy

    import torch

    from tuner.train.parallel import WorkerContext, weights_digest

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    twin = copy.deepcopy(model)
    mine = weights_digest(model.state_dict().values())
    assert weights_digest(twin.state_dict().values()) == mine
    with torch.no_grad():
        twin[0].weight.view(torch.int16)[7, 3] += 1  # one bf16 ulp of one weight
    drifted = weights_digest(twin.state_dict().values())
    assert drifted != mine

    def rank0_with(other: int) -> WorkerContext:  # rank 0, its all-reduce adding rank 1's value
        return WorkerContext(torch.device("cpu"), rank=0, world_size=2,
                             all_reduce_fn=lambda tensor: tensor.add_(float(other)))

    assert rank0_with(mine).agree(mine)
    assert not rank0_with(drifted).agree(mine)
    assert WorkerContext(torch.device("cpu")).agree(mine)  # one process


@pytest.mark.slow
def test_corrupted_train_checkpoint_falls_back_to_the_older_one(tmp_path, capfd):
    cfg = load_config(overrides=["data.synthetic_users=300", "data.synthetic_items=80", "train.max_epochs=2",
                                 "train.batch_size=32", "model.max_len=16", "train.patience=0"])
    fit(cfg, quiet=True, storage=str(tmp_path))
    checkpoints = sorted(p for p in (tmp_path / "train-tiny").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    (checkpoints[-1] / "state.pt").write_bytes(b"not a checkpoint")  # the epoch-2 file is damaged
    cfg.train.max_epochs = 3
    copies = set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))
    final = fit(cfg, quiet=True, storage=str(tmp_path))  # same run: Train resumes it
    assert final["epochs"] == 3  # epoch 2 redone from the epoch-1 checkpoint, then epoch 3
    # read in place: no copy of the checkpoint left in the temporary directory
    assert set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")) == copies
    assert "resuming from the older checkpoint" in capfd.readouterr().err
    # the same run name with another catalog: one line naming the run and the way out
    cfg.data.synthetic_items = 90
    with pytest.raises(UserError, match=r"train-tiny holds a checkpoint of another model or catalog; pass --run-name"):
        fit(cfg, quiet=True, storage=str(tmp_path))


@pytest.mark.slow
def test_short_epochs_are_not_stretched_by_ray_train(tmp_path, capfd):
    """Ray Train's controller polls workers every 2 s by default and a report waits for the poll:
    epochs shorter than that used to take 2 s each. Now a cycle costs what its work costs."""
    import re
    import statistics

    cfg = load_config(overrides=["data.synthetic_users=300", "data.synthetic_items=80", "train.max_epochs=7",
                                 "train.batch_size=32", "model.max_len=16", "train.patience=0"])
    fit(cfg, quiet=False, storage=str(tmp_path))
    captured = capfd.readouterr()
    lines = re.findall(r"epoch\s+(\d+)\s+at ([\d.]+)s.*?epoch_s ([\d.]+)\s+eval_s ([\d.]+)",
                       captured.out + captured.err)
    rows = {int(e): (float(at), float(ep) + float(ev)) for e, at, ep, ev in lines}  # Ray may echo a line
    assert sorted(rows) == list(range(1, 8))
    gaps = [rows[e][0] - rows[e - 1][0] for e in range(3, 8)]
    work = statistics.median(rows[e][1] for e in range(3, 8))
    assert work < 1.0  # short epochs, or the check below says nothing
    assert statistics.median(gaps) - work < 0.5, (gaps, work)
