"""How much of a dataset's training data the model's length cuts off (the case for
`train.window_prob`): per max_len, the share of users whose training history is longer, and the
share of training interactions that lie before each history's latest max_len items (never seen
without random windows). Training histories as `tuner train` splits them (leave-one-out).

    python benchmarks/history_lengths.py --out benchmarks/results/history_lengths.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paths import ml1m_default  # noqa: E402

from tuner.data.dataset import load_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=ml1m_default())
    parser.add_argument("--max-len", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"history_lengths.py: no dataset at {args.data} (pass --data)")
    dataset = load_dataset(argparse.Namespace(path=args.data))
    train, _, _ = dataset.split()
    lengths = train.lengths
    rows = [{"max_len": n, "users_longer": float((lengths > n).mean()),
             "interactions_beyond": float(np.maximum(lengths - n, 0).sum() / lengths.sum())}
            for n in args.max_len]
    out = {"dataset": args.data, "users": int(len(lengths)), "training_interactions": int(lengths.sum()),
           "command": "python benchmarks/history_lengths.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
