"""Checkpoints written off the training thread: the copy is the state of its epoch, not of later
steps, its buffers are reused only after its write, and a failed write frees them too."""

import threading

import pytest
import torch

from tuner.errors import UserError
from tuner.train.checkpoint import Snapshots, load_checkpoint


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(32, 8)).square().mean().backward()
    optimizer.step()


def test_a_snapshot_holds_its_epochs_state_while_training_goes_on(tmp_path):
    model, optimizer = model_and_optimizer()
    train_step(model, optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    snapshot = Snapshots().take({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "progress": {"epoch": 1}})
    for _ in range(3):  # the next epoch trains while the write has not happened yet
        train_step(model, optimizer)
    assert snapshot.write_s is None and not snapshot.released
    snapshot.write(tmp_path)
    assert snapshot.write_s > 0  # what train.checkpoint_share weighs the next checkpoint by
    assert snapshot.released  # the buffers are free for the next snapshot
    state = load_checkpoint(tmp_path)
    assert state["progress"] == {"epoch": 1}
    for key, value in expected.items():
        assert torch.equal(state["model"][key], value), key
        assert not torch.equal(model.state_dict()[key], value), key  # the live model did move on
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_the_next_snapshot_waits_for_the_previous_write_and_reuses_its_buffers(tmp_path):
    model, optimizer = model_and_optimizer()
    snapshots = Snapshots()
    first = snapshots.take({"model": model.state_dict()})
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(snapshots.take({"model": model.state_dict()})))
    waiter.start()
    waiter.join(0.5)
    assert not taken  # the first copy is not written yet: its buffers are not free
    first.write(tmp_path)
    waiter.join(10)
    assert taken
    second = taken[0]
    assert all(second.state["model"][k].data_ptr() == first.state["model"][k].data_ptr()
               for k in first.state["model"])


def test_a_failed_write_is_a_clear_error_and_frees_the_buffers(tmp_path):
    model, _ = model_and_optimizer()
    snapshots = Snapshots()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write a checkpoint"):
        snapshots.take({"model": model.state_dict()}).write(blocker / "ckpt")
    done = []
    thread = threading.Thread(target=lambda: done.append(snapshots.take({"model": model.state_dict()})))
    thread.start()
    thread.join(5)
    assert done, "a failed write kept the buffers"


def test_entries_taken_as_they_are_are_not_copied():
    best = {"w": torch.ones(3)}
    snapshot = Snapshots().take({"best_model": best, "model": {"w": torch.zeros(3)}}, as_is=("best_model",))
    assert snapshot.state["best_model"] is best


def test_a_write_that_never_ends_does_not_hold_training_back_forever(capfd):
    model, _ = model_and_optimizer()
    snapshots = Snapshots(wait_s=0.2)
    stuck = snapshots.take({"model": model.state_dict()})  # never written, never released
    before = {k: v.clone() for k, v in stuck.state["model"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    second = snapshots.take({"model": model.state_dict()})
    assert "still not written" in capfd.readouterr().err
    for key, value in before.items():  # the stuck copy was left alone
        assert torch.equal(stuck.state["model"][key], value)
        assert second.state["model"][key].data_ptr() != stuck.state["model"][key].data_ptr()
        assert torch.equal(second.state["model"][key], model.state_dict()[key])
