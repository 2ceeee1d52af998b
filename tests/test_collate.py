"""Padding and cloze masking: what a masked batch must look like."""

import numpy as np

from tuner.data.collate import IGNORE, mask_batch, pad_left, train_batches
from tuner.data.dataset import Sequences
from tuner.data.synthetic import generate


def test_pad_left_keeps_the_latest_items():
    seq = Sequences(np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), np.array([0, 2, 6]))
    out = pad_left(seq, np.array([0, 1]), 3)
    assert out.tolist() == [[0, 1, 2], [4, 5, 6]]


def test_masking_statistics_and_labels():
    rng = np.random.default_rng(0)
    num_items = 1000
    ids = rng.integers(1, num_items + 1, size=(512, 50)).astype(np.int32)
    ids[:, :10] = 0  # padding
    batch = mask_batch(ids, num_items, mask_prob=0.2, last_item_prob=0.0, rng=rng)
    items, positions, labels = batch.items.numpy(), batch.positions.numpy(), batch.labels.numpy()
    real = labels != IGNORE
    pos, lab = positions[real], labels[real]
    flat_ids, flat_items = ids.reshape(-1), items.reshape(-1)
    assert (flat_ids[pos] == lab).all()  # labels are the original items
    assert (flat_ids[pos] != 0).all()  # padding is never a target
    assert abs(len(pos) / (ids != 0).sum() - 0.2) < 0.01
    became_mask = (flat_items[pos] == num_items + 1).mean()
    assert abs(became_mask - 0.8) < 0.02
    unchanged = (flat_items[pos] == lab).mean()
    assert abs(unchanged - 0.1) < 0.02  # (plus random draws that hit the same item: negligible)
    untouched = np.setdiff1d(np.arange(flat_ids.size), pos)
    assert (flat_items[untouched] == flat_ids[untouched]).all()
    assert len(positions) % 64 == 0


def test_last_item_rows_mask_only_the_last_item():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 100, size=(64, 10)).astype(np.int32)
    batch = mask_batch(ids, 99, mask_prob=0.5, last_item_prob=1.0, rng=rng)
    pos = batch.positions.numpy()[batch.labels.numpy() != IGNORE]
    assert sorted(pos.tolist()) == [r * 10 + 9 for r in range(64)]


def test_epochs_are_reproducible_and_ranks_disjoint():
    data = generate(200, 50, seed=0)
    args = dict(train=data.sequences, num_items=50, batch_size=32, max_len=12, mask_prob=0.2,
                last_item_prob=0.1, seed=3, epoch=1)
    a = [b.items for b in train_batches(**args)]
    b = [b.items for b in train_batches(**args)]
    assert all((x == y).all() for x, y in zip(a, b))
    c = [b.items for b in train_batches(**{**args, "epoch": 2})]
    assert not all(x.shape == y.shape and (x == y).all() for x, y in zip(a, c))
    r0 = list(train_batches(**args, rank=0, world_size=2))
    r1 = list(train_batches(**args, rank=1, world_size=2))
    assert len(r0) == len(r1)
    assert sum(x.num_samples for x in r0) == sum(x.num_samples for x in r1) == 100


def _users_of(batches, length):
    """The user of each row of each batch, for histories that repeat their user's id (the labels)."""
    out = []
    for b in batches:
        real = b.labels != IGNORE
        users = np.zeros(b.items.shape[0], dtype=np.int64)
        users[(b.positions[real] // length).numpy()] = b.labels[real].numpy()
        out.append(users)
    return out


def test_fixed_shapes_train_every_user_and_fill_the_last_batch_with_the_first():
    """Every user trains every epoch with fixed shapes too: as many batches as without them, the
    last one filled up with the epoch's first users (cyclically where a batch outnumbers them)."""
    length = 10
    for users, batch in ((150, 64), (40, 64)):
        seq = Sequences(np.repeat(np.arange(1, users + 1, dtype=np.int32), length), np.arange(users + 1) * length)
        runs = {static: _users_of(train_batches(seq, users, batch, length, 0.2, 0.1, seed=0, epoch=0,
                                                 static_shapes=static), length)
                for static in (False, True)}
        order = np.concatenate(runs[False])
        assert sorted(order.tolist()) == list(range(1, users + 1))
        assert len(runs[True]) == len(runs[False]) and {len(u) for u in runs[True]} == {batch}
        assert np.array_equal(np.concatenate(runs[True]), np.resize(order, len(runs[True]) * batch))


def test_static_shapes_give_identical_batch_shapes():
    from tuner.data.collate import static_predictions

    data = generate(300, 80, seed=1)
    batches = list(train_batches(data.sequences, 80, 64, 20, 0.2, 0.1, seed=0, epoch=0, static_shapes=True))
    cap = static_predictions(64, 20, 0.2, 0.1, data.sequences.lengths)
    assert len(batches) == -(-300 // 64)  # the last batch filled up, not dropped
    assert {tuple(b.items.shape) for b in batches} == {(64, 20)}
    assert {tuple(b.positions.shape) for b in batches} == {(cap,)}
    for b in batches:
        real = b.labels != IGNORE
        flat = b.items.reshape(-1)
        # every predicted slot hides its label behind the mask, a random item, or itself
        assert real.sum() > 0 and (flat[b.positions[real]] != 0).all()


def test_prediction_slots_follow_the_histories_lengths():
    """Short histories get fewer fixed slots than full-length rows would; full-length data the same
    as without lengths; and over many epochs a batch rarely draws more than its slots."""
    from tuner.data.collate import static_predictions

    data = generate(3000, 80, seed=1)  # histories of 8-40 items, a length of 50
    lengths = data.sequences.lengths
    sized = static_predictions(64, 50, 0.2, 0.1, lengths)
    assert sized < static_predictions(64, 50, 0.2, 0.1) * 0.7
    assert static_predictions(64, 50, 0.2, 0.1, np.full(100, 80)) == static_predictions(64, 50, 0.2, 0.1)
    counts = [int((b.labels != IGNORE).sum()) for epoch in range(10)
              for b in train_batches(data.sequences, 80, 64, 50, 0.2, 0.1, seed=0, epoch=epoch)
              if b.num_samples == 64]
    assert np.mean(counts) < sized and sum(c > sized for c in counts) <= 1, (sized, max(counts))


def test_surplus_predictions_are_left_unmasked():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(8, 10)).astype(np.int32)
    batch = mask_batch(ids, 49, mask_prob=0.9, last_item_prob=0.0, rng=rng, max_predictions=16)
    real = (batch.labels != IGNORE).numpy()
    assert len(batch.positions) == 16 and real.sum() == 16
    changed = (batch.items.numpy() != ids).reshape(-1)
    predicted = np.zeros(80, dtype=bool)
    predicted[batch.positions.numpy()[real]] = True
    assert not (changed & ~predicted).any()  # nothing is masked that is not predicted


def _unmasked_rows(batch):
    """The batch's id matrix with every predicted slot given back its label."""
    ids = batch.items.clone().reshape(-1)
    real = batch.labels != IGNORE
    ids[batch.positions[real]] = batch.labels[real]
    return ids.reshape(batch.items.shape).numpy()


def test_long_histories_train_on_random_windows_only_when_asked():
    # user u's history is u*100+1 .. u*100+n_u, so a row tells whose it is and where it was cut
    lengths = np.array([5, 30, 60, 12, 45, 80])
    items = np.concatenate([u * 100 + 1 + np.arange(n) for u, n in enumerate(lengths)]).astype(np.int32)
    seq = Sequences(items, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    max_len = 20

    def windows(window_prob, epochs=30):
        seen = {}
        for epoch in range(epochs):
            for batch in train_batches(seq, 700, 4, max_len, 0.3, 0.1, seed=0, epoch=epoch,
                                       window_prob=window_prob):
                for row in _unmasked_rows(batch):
                    real = row[row != 0]
                    user = int(real[0]) // 100
                    assert len(real) == min(lengths[user], max_len)
                    assert (np.diff(real) == 1).all()  # a contiguous stretch of the history
                    seen.setdefault(user, set()).add(int(real[-1]) % 100)  # where the window ends
        return seen

    latest = windows(0.0)
    assert all(ends == {lengths[u]} for u, ends in latest.items())  # always the latest items
    moved = windows(1.0)
    for user, n in enumerate(lengths):
        if n <= max_len:
            assert moved[user] == {n}
        else:  # windows at many places in the history, none past its end
            assert len(moved[user]) > 5 and max_len <= min(moved[user]) and max(moved[user]) <= n
    assert min(moved[5]) < 40  # the long history's early items are seen
    again = windows(1.0)
    assert again == moved  # seeded per epoch: a resumed run draws the same windows


def test_fixed_slots_train_exactly_what_the_batch_without_them_trains():
    """The padded slots of fixed shapes (index 0, label IGNORE) change nothing: the same masks
    padded to `static_predictions` slots and to a multiple of `label_bucket` give the same loss and
    the same gradient for every weight, through the model's pruned last block (it runs on the
    slots' rows alone, the padding's among them), for each full-catalog loss and with iLoRA's
    per-sequence gates picked at the slots."""
    import pytest
    import torch

    from tuner.config import load_config
    from tuner.data.collate import static_predictions
    from tuner.losses import MaskedItemObjective, loss_config
    from tuner.model.build import build_model

    data = generate(64, 60, seed=3)
    ids = pad_left(data.sequences, np.arange(32), 20)
    slots = static_predictions(32, 20, 0.3, 0.1, data.sequences.lengths)
    bucketed = mask_batch(ids, 60, 0.3, 0.1, np.random.default_rng(5))
    fixed = mask_batch(ids, 60, 0.3, 0.1, np.random.default_rng(5), max_predictions=slots)
    real = int((bucketed.labels != IGNORE).sum())
    assert torch.equal(fixed.items, bucketed.items) and len(fixed.positions) == slots > len(bucketed.positions)
    assert torch.equal(fixed.positions[:real], bucketed.positions[:real]) and (fixed.positions[real:] == 0).all()
    cases = (["train.loss=ce"], ["train.loss=cce"], ["train.loss=focal"], ["train.loss=ce", "ilora.enabled=true"])
    for overrides in cases:
        cfg = load_config(overrides=["model.max_len=20", "model.dropout=0", "model.attn_dropout=0",
                                     "ilora.dropout=0", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, 60)
        if cfg.ilora.enabled:  # the experts start at zero: give them weights, so their gradients count
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.1)
        objective = MaskedItemObjective(model, loss_config(cfg.train))
        results = []
        for batch in (bucketed, fixed):
            model.zero_grad()
            loss = objective(batch.items, batch.positions, batch.labels)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss.item(), grads))
        (loss_b, grads_b), (loss_f, grads_f) = results
        assert loss_f == pytest.approx(loss_b, rel=1e-6), overrides
        assert grads_f.keys() == grads_b.keys() and len(grads_b) > 4, overrides
        for name, grad in grads_b.items():
            torch.testing.assert_close(grads_f[name], grad, rtol=1e-5, atol=1e-7, msg=f"{overrides} {name}")
