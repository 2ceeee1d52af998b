"""Fixed prediction slots per batch (`train.static_shapes`): sized from the data's history lengths
against sized for full-length rows, on the datasets a trial meets.

    python benchmarks/static_slots.py --epochs 50 --out benchmarks/results/static_slots.json

Every slot is a row of the pruned last block and of the catalog logits, so a padded slot costs
as much as a real prediction. For each dataset and its trial's batch size and length: the slots
either rule gives (`tuner.data.collate.static_predictions` with the training lengths, and with
none: full-length rows), and over `--epochs` epochs of the real collate path (each batch's masking
as drawn without a cap) the mean and largest number of predictions a full batch draws, and how
many batches would draw more than the data-sized slots (their surplus stays unmasked). Counts on
the CPU; no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from paths import ROOT, ml1m_default

sys.path.insert(0, str(ROOT))

from tuner.config import load_config  # noqa: E402
from tuner.data.collate import IGNORE, static_predictions, train_batches  # noqa: E402
from tuner.data.dataset import load_dataset  # noqa: E402


def cases(ml1m: str) -> list[tuple[str, list[str]]]:
    """(name, config overrides): ML-1M at benchmarks/ml1m.yaml's settings, the embedded synthetic
    default, and epoch_cycle.py's synthetic 130M trial (40,000 users, length 50, batch 256)."""
    out = [("synthetic default (3,000 users)", []),
           ("synthetic 40,000 users, 130M", ["model.size=130M", "data.synthetic_users=40000",
                                             "data.synthetic_items=159750", "train.batch_size=256"])]
    if Path(ml1m).exists():
        out.insert(0, ("ML-1M, benchmarks/ml1m.yaml", ["--config", f"data.path={ml1m}", "train.mask_prob=0.342"]))
    return out


def measure(overrides: list[str], epochs: int) -> dict:
    config = None
    if overrides[:1] == ["--config"]:
        config, overrides = str(ROOT / "benchmarks" / "ml1m.yaml"), overrides[1:]
    cfg = load_config(config, overrides=overrides)
    dataset = load_dataset(cfg.data)
    train, _, _ = dataset.split()
    t, batch, length = cfg.train, cfg.train.batch_size, cfg.model.max_len
    sized = static_predictions(batch, length, t.mask_prob, t.last_item_prob, train.lengths)
    counts = []
    for epoch in range(epochs):
        for b in train_batches(train, dataset.num_items, batch, length, t.mask_prob, t.last_item_prob, t.seed,
                               epoch, window_prob=t.window_prob):
            if b.num_samples == batch:  # full batches: what fixed shapes draw (their last one fills up)
                counts.append(int((b.labels != IGNORE).sum()))
    counts = np.array(counts)
    over = counts[counts > sized]
    visible = np.minimum(train.lengths[train.lengths >= 1], length)
    return {"users": int((train.lengths >= 1).sum()), "batch_size": batch, "max_len": length,
            "mask_prob": t.mask_prob, "median_visible": float(np.median(visible)),
            "slots_full_length": static_predictions(batch, length, t.mask_prob, t.last_item_prob),
            "slots_from_lengths": sized, "batches": len(counts), "predictions_mean": float(counts.mean()),
            "predictions_max": int(counts.max()), "batches_over": len(over),
            "surplus_share": float((over - sized).sum() / counts.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--data", default=ml1m_default(), help="the ML-1M file (skipped where absent)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for name, overrides in cases(args.data):
        rows.append({"dataset": name, **measure(overrides, args.epochs)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": "CPU (counts only)", "epochs": args.epochs,
              "command": "python benchmarks/static_slots.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
