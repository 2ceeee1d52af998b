"""Preparation speed: an ML-20M-sized synthetic ratings.csv (20M rows) through `tuner prepare`.

Writes the file once (NumPy + pyarrow, seeded), then times `prepare()` with 5-core filtering and
records wall time and the process's peak RSS. Run: `python benchmarks/prepare_speed.py`
(writes benchmarks/results/prepare_speed.json). Median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from tuner.data.prepare import prepare


def write_ratings(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    popularity /= popularity.sum()
    table = pa.table({
        "userId": rng.integers(1, users + 1, rows),
        "movieId": rng.choice(items, size=rows, p=popularity) + 1,
        "rating": rng.integers(1, 6, rows).astype(np.float32) / 1.0,
        "timestamp": rng.integers(789_652_009, 1_427_784_002, rows),
    })
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="none"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=138_493)  # ML-20M's counts
    parser.add_argument("--items", type=int, default=26_744)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "prepare_speed.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ratings.csv"
        write_ratings(src, args.rows, args.users, args.items)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            meta = prepare(str(src), str(Path(tmp) / f"out{k}"), min_user_interactions=5,
                           min_item_interactions=5)["meta"]
            times.append(time.perf_counter() - t0)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {
            "device": f"CPU: {platform.processor() or platform.machine()}, "
                      f"{len(__import__('os').sched_getaffinity(0))} cores",
            "command": "python benchmarks/prepare_speed.py",
            "rows": args.rows, "input_mb": round(src.stat().st_size / 2**20, 1),
            "median_s": round(statistics.median(times), 2), "times_s": [round(t, 2) for t in times],
            "peak_rss_mb": round(peak_rss_mb), "rss_before_mb": round(rss_before / 1024),
            "num_users": meta["num_users"], "num_items": meta["num_items"],
            "num_interactions": meta["num_interactions"],
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
