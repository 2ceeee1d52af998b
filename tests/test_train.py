"""The per-worker loop on its own: it learns, it resumes exactly, it refuses foreign checkpoints."""

import time

import pytest
import torch

from tuner.config import load_config
from tuner.errors import UserError
from tuner.train.checkpoint import load_checkpoint, save_checkpoint
from tuner.train.loop import checkpoint_spaced, resumed_best, train_worker
from tuner.train.parallel import WorkerContext, local_context
from tuner.train.reporting import ConsoleReporter

FAST = ["data.synthetic_users=1500", "data.synthetic_items=400", "train.batch_size=64",
        "model.max_len=16", "eval.num_negatives=20"]


class Recorder:
    """Collects what the loop reports; can simulate a crash after some epoch."""

    def __init__(self, crash_after: int = 0):
        self.epochs, self.finals, self.crash_after = [], [], crash_after

    def log(self, epoch, metrics, checkpoint=None):
        # a checkpoint handed to the reporter is written by it (as Ray's upload thread does) or
        # the next one waits for its buffers; here only its epoch is kept
        if checkpoint is not None:
            epoch_of_state = checkpoint.state["progress"]["epoch"]
            checkpoint.release()
            checkpoint = epoch_of_state
        self.epochs.append((epoch, dict(metrics), checkpoint))
        if epoch == self.crash_after:
            raise RuntimeError("simulated crash")

    def final(self, metrics):
        self.finals.append(metrics)


@pytest.mark.parametrize("extra", [[], ["train.amp=fp16", "model.residual=half"]],
                         ids=["fp32", "fp16_stream_loss_scaling"])
def test_tiny_beats_popularity_twice_over(extra):
    cfg = load_config(overrides=FAST + ["train.max_epochs=15", "optim.lr=5e-3", *extra])
    result = train_worker(cfg, local_context(cfg.train), ConsoleReporter(enabled=False))
    assert result["test_hr_10"] >= 2 * result["popularity_hr_10"], result
    for key in ("test_hr_10", "test_ndcg_10", "val_ndcg_10", "popularity_hr_10", "epochs", "samples_per_s",
                "peak_mem_mb", "trainable_params", "total_params", "test_uni100_hr_10", "test_pop100_ndcg_10",
                "test_mrr", "test_ndcg_20"):
        assert key in result


@pytest.mark.parametrize("extra", [[], ["optim.ema_decay=0.9", "train.window_prob=0.5"],
                                   ["train.amp=bf16", "train.weights=bf16"]],
                         ids=["weights", "weight_average_random_windows", "bf16_weights_fp32_masters"])
def test_interrupted_run_resumes_exactly(tmp_path, extra):
    # a checkpoint every epoch (train.checkpoint_share=0): the crash after epoch 2 resumes from 2
    over = FAST + ["train.max_epochs=4", "train.patience=0", "train.checkpoint_share=0"] + extra
    straight = load_config(overrides=over + [f"train.checkpoint_dir={tmp_path / 'a'}"])
    expected = Recorder()
    final_a = train_worker(straight, local_context(straight.train), expected)

    resumed = load_config(overrides=over + [f"train.checkpoint_dir={tmp_path / 'b'}"])
    crashed = Recorder(crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_worker(resumed, local_context(resumed.train), crashed)
    assert load_checkpoint(tmp_path / "b")["progress"]["epoch"] == 2
    rest = Recorder()
    final_b = train_worker(resumed, local_context(resumed.train), rest)
    assert [e for e, _, _ in rest.epochs] == [3, 4]  # no epoch re-run, none skipped
    for (_, a, _), (_, b, _) in zip(expected.epochs[2:], rest.epochs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_ndcg_10"] == pytest.approx(b["val_ndcg_10"], rel=1e-6)
    state_a, state_b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for name, tensor in state_a["model"].items():
        torch.testing.assert_close(tensor, state_b["model"][name], rtol=1e-5, atol=1e-6)
    assert final_a["test_ndcg_10"] == pytest.approx(final_b["test_ndcg_10"], rel=1e-6)


def test_an_epoch_that_sets_the_best_writes_the_weights_once_and_a_resume_reads_them_back(tmp_path):
    from tuner.model.build import build_model

    for extra, aliased in (([], True), (["optim.ema_decay=0.9"], False)):  # the average's best is not the model
        folder = tmp_path / str(aliased)
        cfg = load_config(overrides=FAST + ["train.max_epochs=1", f"train.checkpoint_dir={folder}"] + extra)
        train_worker(cfg, local_context(cfg.train), Recorder())
        state = load_checkpoint(folder)
        assert state["progress"]["best_epoch"] == state["progress"]["epoch"] == 1  # the first epoch sets the best
        assert (state["best_model"] is None) == aliased
    model = build_model(cfg, state["num_items"], pretrained=False)
    state = load_checkpoint(tmp_path / "True")
    model.load_state_dict(state["model"])
    best = resumed_best(state, model, refit=False)
    assert best.keys() == state["model"].keys() and all(torch.equal(best[k], v) for k, v in state["model"].items())
    assert resumed_best(state, model, refit=True) is None  # a refit selects nothing
    copy = {k: v + 1 for k, v in state["model"].items()}
    assert resumed_best({**state, "best_model": copy}, model, refit=False) is copy


@pytest.mark.parametrize("setting, static", [("auto", 0.0), ("false", 0.0), ("true", 1.0)])
def test_a_trial_reports_what_its_batch_shapes_came_to(setting, static):
    """1,500 users in batches of 64: 23 full ones and a last of 28. On a CPU auto keeps the batches
    as they come (the step graph needs CUDA); fixed shapes fill the last one up, so every setting
    takes 24 steps."""
    cfg = load_config(overrides=FAST + ["train.max_epochs=1", f"train.static_shapes={setting}"])
    result = train_worker(cfg, local_context(cfg.train), ConsoleReporter(enabled=False))
    assert (result["static_shapes"], result["step_graph"], result["steps"]) == (static, 0.0, 24)


def test_random_windows_reach_the_training_batches():
    losses = {}
    for prob in (0.0, 1.0):
        cfg = load_config(overrides=FAST + ["train.max_epochs=1", f"train.window_prob={prob}"])
        rec = Recorder()
        train_worker(cfg, local_context(cfg.train), rec)
        losses[prob] = rec.epochs[0][1]["train_loss"]
    assert losses[0.0] != losses[1.0]  # other items were trained on (the loop is deterministic)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    cfg = load_config(overrides=FAST + ["train.max_epochs=1", f"train.checkpoint_dir={tmp_path}"])
    train_worker(cfg, local_context(cfg.train), Recorder())
    other = load_config(overrides=FAST + ["train.max_epochs=1", f"train.checkpoint_dir={tmp_path}",
                                          "model.size=bert4rec", "model.max_len=16"])
    with pytest.raises(UserError, match="another model or catalog"):
        train_worker(other, local_context(other.train), Recorder())


def test_checkpoint_with_other_weight_storage_is_refused(tmp_path):
    over = FAST + ["train.max_epochs=1", f"train.checkpoint_dir={tmp_path}", "train.amp=bf16"]
    cfg = load_config(overrides=over + ["train.weights=fp32"])
    train_worker(cfg, local_context(cfg.train), Recorder())
    other = load_config(overrides=over + ["train.weights=bf16", "train.max_epochs=2"])
    with pytest.raises(UserError, match="trained with fp32 weights and this run's are bf16"):
        train_worker(other, local_context(other.train), Recorder())


def test_bf16_weights_without_bf16_autocast_is_refused():
    cfg = load_config(overrides=FAST + ["train.max_epochs=1", "train.weights=bf16"])  # amp auto: off on a CPU
    with pytest.raises(UserError, match="train.weights=bf16 needs bf16 autocast.*set train.amp=bf16"):
        train_worker(cfg, local_context(cfg.train), Recorder())


def test_foreign_checkpoint_file_is_refused(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="not a tuner BERT4Rec checkpoint"):
        load_checkpoint(tmp_path)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    over = FAST + ["train.max_epochs=3", "train.patience=0", "train.checkpoint_share=0",
                   f"train.checkpoint_dir={tmp_path}"]
    cfg = load_config(overrides=over)
    crashed = Recorder(crash_after=2)
    with pytest.raises(RuntimeError):
        train_worker(cfg, local_context(cfg.train), crashed)
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a write cut short
    rest = Recorder()
    train_worker(cfg, local_context(cfg.train), rest)
    assert [e for e, _, _ in rest.epochs] == [2, 3]  # epoch 2 redone from epoch 1's checkpoint
    assert "resuming from the previous checkpoint" in capsys.readouterr().err


def test_focal_loss_and_memory_release_train_end_to_end():
    cfg = load_config(overrides=FAST + ["train.max_epochs=2", "train.loss=focal", "train.release_memory=true",
                                        "optim.embedding_lr_mult=2"])
    result = train_worker(cfg, local_context(cfg.train), Recorder())
    assert result["epochs"] == 2 and result["test_hr_10"] > 0


def test_refit_trains_on_the_validation_targets_for_exactly_max_epochs():
    import numpy as np

    cfg = load_config(overrides=FAST + ["train.max_epochs=4", "train.patience=1", "train.refit=true",
                                        "optim.lr=1e-6"])  # too small to improve: patience would stop it
    from tuner.data.dataset import load_dataset

    full = load_dataset(cfg.data)
    train, val, test = full.split(include_val=True)
    held_out, _, _ = full.split()
    users = val.users
    # each evaluable user trains on one more item, its validation target, and never on the test item
    assert np.array_equal(train.lengths[users], held_out.lengths[users] + 1)
    assert np.array_equal(train.items[train.offsets[users + 1] - 1], val.targets)
    assert np.array_equal(train.lengths[users] + 1, full.sequences.lengths[users])
    recorder = Recorder()
    result = train_worker(cfg, local_context(cfg.train), recorder)
    assert [e for e, _, _ in recorder.epochs] == [1, 2, 3, 4]  # no early stop: nothing is validated
    assert not any(k.startswith("val_") for _, m, _ in recorder.epochs for k in m)
    assert not any(k.startswith("val_") for k in result)  # not held out any more: not reported
    assert result["best_epoch"] == 4 and result["refit"] == 1.0 and result["test_ndcg_10"] > 0


def test_time_budget_ends_training_in_time_and_still_tests_the_best_weights():
    cfg = load_config(overrides=FAST + ["train.max_epochs=10000", "train.time_budget_s=6"])
    recorder = Recorder()
    t0 = time.perf_counter()
    result = train_worker(cfg, local_context(cfg.train), recorder)
    train_s = sum(m["epoch_s"] for _, m, _ in recorder.epochs)
    assert 1 <= result["epochs"] < 10000 and result["out_of_time"] == 1.0
    assert train_s <= 6 + max(m["epoch_s"] for _, m, _ in recorder.epochs)  # stops before overrunning
    assert time.perf_counter() - t0 < 30
    assert recorder.finals and result["test_ndcg_10"] > 0
    # the cosine decay was fitted into the budget: the last epoch trained at the bottom of it
    lrs = [m["lr"] for _, m, _ in recorder.epochs]
    assert lrs[-1] < 0.2 * max(lrs), lrs


def test_without_anneal_to_deadline_the_budget_cuts_the_schedule_midway():
    cfg = load_config(overrides=FAST + ["train.max_epochs=10000", "train.time_budget_s=4",
                                        "train.anneal_to_deadline=false"])
    recorder = Recorder()
    train_worker(cfg, local_context(cfg.train), recorder)
    lrs = [m["lr"] for _, m, _ in recorder.epochs]
    assert lrs[-1] > 0.9 * max(lrs), lrs


def test_epochs_that_fit_ignores_the_compile_epoch():
    from tuner.train.loop import epochs_that_fit

    assert epochs_that_fit([40.0], 400) is None  # compile epoch only: no estimate, no shortening
    assert epochs_that_fit([40.0, 1.0], 400) is None
    assert epochs_that_fit([40.0, 1.0, 1.2], 400) == 363  # 400 / 1.1, not 400 / 40
    assert epochs_that_fit([40.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0], 100) == 100  # one slow epoch does not decide
    assert epochs_that_fit([1.0, 1.0, 1.0], -3) == 0


def test_checkpoint_every_n_epochs_and_always_the_last(tmp_path):
    cfg = load_config(overrides=FAST + ["train.max_epochs=4", "train.patience=0", "train.checkpoint_every=3",
                                        "train.checkpoint_share=0"])
    recorder = Recorder()  # as under Ray Train: checkpoints travel to the reporter
    train_worker(cfg, WorkerContext(device=torch.device("cpu"), reports_checkpoints=True), recorder)
    assert [c for _, _, c in recorder.epochs] == [None, None, 3, 4]


class WritingRecorder(Recorder):
    """Writes each checkpoint it is handed into `directory`, as Ray's upload thread does (here inline)."""

    def __init__(self, directory):
        super().__init__()
        self.directory = directory

    def log(self, epoch, metrics, checkpoint=None):
        if checkpoint is not None:
            checkpoint.write(self.directory)
        super().log(epoch, metrics, None)


def test_a_write_that_takes_more_than_its_share_of_the_time_puts_the_next_checkpoints_off(tmp_path, monkeypatch):
    import tuner.train.checkpoint
    import tuner.train.loop

    written = []

    def slow_disk(directory, state):  # a disk that takes a second a checkpoint
        time.sleep(1.0)
        written.append(state["progress"]["epoch"])
        return save_checkpoint(directory, state)

    monkeypatch.setattr(tuner.train.loop, "save_checkpoint", slow_disk)  # one process: the loop writes
    monkeypatch.setattr(tuner.train.checkpoint, "save_checkpoint", slow_disk)  # Ray Train: Snapshot.write
    # one process writing in line, one writing on a thread (the next epoch does not wait for the
    # write, and no checkpoint is due while one is being written), Ray Train
    for ray, writer in ((False, "inline"), (False, "background"), (True, "auto")):
        for share, expected in ((0.0, [1, 2, 3, 4]), (0.01, [1, 4])):  # 0.01: 100 s after a 1 s write; the last always
            written.clear()
            folder = tmp_path / f"{writer}_{share}"
            cfg = load_config(overrides=FAST + ["train.max_epochs=4", "train.patience=0",
                                                f"train.checkpoint_share={share}", f"train.checkpoint_writer={writer}"]
                              + ([] if ray else [f"train.checkpoint_dir={folder}"]))
            ctx = (WorkerContext(device=torch.device("cpu"), reports_checkpoints=True) if ray
                   else local_context(cfg.train))
            train_worker(cfg, ctx, WritingRecorder(folder) if ray else Recorder())
            assert written == expected, (writer, share)
    assert checkpoint_spaced(0.0, 1.0, 50.0) and checkpoint_spaced(0.1, None, 50.0)
    assert checkpoint_spaced(0.1, 1.0, None)
    assert not checkpoint_spaced(0.1, 9.9, 1.0) and checkpoint_spaced(0.1, 10.0, 1.0)


class DiskLog(Recorder):
    """A Recorder that notes which checkpoints had reached the disk when each epoch was reported."""

    def __init__(self, on_disk: list, crash_after: int = 0):
        super().__init__(crash_after)
        self.on_disk, self.seen = on_disk, []

    def log(self, epoch, metrics, checkpoint=None):
        self.seen.append(list(self.on_disk))
        super().log(epoch, metrics, checkpoint)


def test_one_process_trains_on_while_its_checkpoint_is_written(tmp_path, monkeypatch):
    """`tuner train --checkpoint-dir` writes each checkpoint on a thread while the next epoch trains
    (train.checkpoint_writer=background, auto's choice on a GPU): with a disk that takes a second a write,
    epoch 1 is reported before its checkpoint is on disk, where the in-line writer makes the
    epoch wait for it. The last checkpoint is on disk when the run returns, and a run that fails
    mid-way still finishes the write under way before it raises."""
    import tuner.train.checkpoint
    import tuner.train.loop

    on_disk = []

    def slow_disk(directory, state):
        time.sleep(1.0)
        path = save_checkpoint(directory, state)
        on_disk.append(state["progress"]["epoch"])
        return path

    monkeypatch.setattr(tuner.train.loop, "save_checkpoint", slow_disk)  # the in-line writer
    monkeypatch.setattr(tuner.train.checkpoint, "save_checkpoint", slow_disk)  # Snapshot.write
    seen = {}
    for writer in ("background", "inline"):
        on_disk.clear()
        folder = tmp_path / writer
        cfg = load_config(overrides=FAST + ["train.max_epochs=3", "train.patience=0", "train.checkpoint_share=0",
                                            f"train.checkpoint_writer={writer}", f"train.checkpoint_dir={folder}"])
        log = DiskLog(on_disk)
        train_worker(cfg, local_context(cfg.train), log)
        seen[writer] = log.seen
        assert on_disk == [1, 2, 3] and load_checkpoint(folder)["progress"]["epoch"] == 3
    assert seen["inline"] == [[1], [1, 2], [1, 2, 3]]
    assert seen["background"][0] == []  # epoch 1 reported while its checkpoint was still being written

    on_disk.clear()
    folder = tmp_path / "crash"
    cfg = load_config(overrides=FAST + ["train.max_epochs=3", "train.patience=0", "train.checkpoint_share=0",
                                        "train.checkpoint_writer=background", f"train.checkpoint_dir={folder}"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_worker(cfg, local_context(cfg.train), DiskLog(on_disk, crash_after=2))
    assert load_checkpoint(folder)["progress"]["epoch"] == 2  # the write under way ended first


def test_a_profiled_epoch_says_how_busy_the_device_was_and_what_ran(tmp_path):
    out = tmp_path / "profile" / "epoch2.txt"
    cfg = load_config(overrides=FAST + ["train.max_epochs=2", "train.profile_epoch=2", f"train.profile_out={out}"])
    recorder = Recorder()
    train_worker(cfg, local_context(cfg.train), recorder)
    text = out.read_text()
    header = text.splitlines()[1].split()
    fields = dict(zip(header[1::2], header[2::2]))
    assert float(fields["wall_s"]) > 0 and float(fields["cpu_op_s"]) > 0
    epoch_s = recorder.epochs[1][1]["epoch_s"]  # the profiled epoch's time, without the profiler's summary work
    assert abs(float(fields["wall_s"]) - epoch_s) < 0.05 * epoch_s + 0.01, (fields, epoch_s)
    assert "aten::" in text  # the operator table
    assert "training epoch 2" in text


def test_the_weight_average_is_what_is_validated_and_served(tmp_path):
    over = FAST + ["train.max_epochs=2", "train.patience=0"]
    runs = {}
    for name, extra in (("plain", []), ("averaged", ["optim.ema_decay=0.9"])):
        cfg = load_config(overrides=over + extra)
        runs[name] = Recorder()
        train_worker(cfg, local_context(cfg.train), runs[name])
    for (_, plain, _), (_, averaged, _) in zip(runs["plain"].epochs, runs["averaged"].epochs):
        assert averaged["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)  # training untouched
        assert averaged["val_ndcg_10"] != plain["val_ndcg_10"]  # validated on other weights

    cfg = load_config(overrides=over + ["optim.ema_decay=0.9", "train.refit=true", f"train.checkpoint_dir={tmp_path}"])
    train_worker(cfg, local_context(cfg.train), Recorder())
    state = load_checkpoint(tmp_path)
    assert int(state["ema"]["n_averaged"]) == state["progress"]["step"]  # updated after every step
    changed = 0
    for name, live in state["model"].items():  # served weights (best_model) = the average, not the live ones
        torch.testing.assert_close(state["best_model"][name], state["ema"][f"module.{name}"])
        changed += not torch.equal(state["best_model"][name], live)
    assert changed > 0
