"""The README quickstart's main job, timed: `tuner tune` with no arguments in an empty folder.

    python benchmarks/quickstart.py --out benchmarks/results/quickstart.json

Records the wall time, how many trials ASHA stopped, and the best trial's test HR@10 against the
popularity baseline, as `tuner tune --json` reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "tuner", "tune", "--json"], cwd=folder,
                              capture_output=True, text=True)
        wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"tuner tune failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"device": f"CPU ({os.cpu_count()} cores)", "command": "python benchmarks/quickstart.py "
              + " ".join(sys.argv[1:]), "wall_s": wall,
              **{k: summary.get(k) for k in ("num_trials", "trials_stopped_early", "trials_completed",
                                             "test_hr_10", "test_ndcg_10", "popularity_hr_10")}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
