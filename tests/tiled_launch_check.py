"""On a GPU: `short_attention_check.py`'s cases with tiled_attention's kernels on each shape's
"best" row of a `benchmarks/tiled_attention_tiles.py` result (the rows that became
`tiled_attention.LAUNCHES`), bf16 with 10% attention dropout against float64 attention with the
kernels' own mask, and a compiled model at 200 positions against SDPA-efficient. Prints a JSON
object. Session 25 ran it on an H200 as results/attention_dropout_h200/short_attention_check_cuda_launch.json:

    python tests/tiled_launch_check.py benchmarks/results/attention_dropout_h200/tiled_attention_launch.json
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import short_attention_check as check  # noqa: E402

from tuner.model import tiled_attention  # noqa: E402


def main() -> None:
    rows = json.loads(Path(sys.argv[1]).read_text())["rows"]
    out = {}
    for size, length in (("ml1m", 200), ("430M", 512)):
        best = next(r for r in rows if r["size"] == size and r["kernel"] == "best")
        tiled_attention.LAUNCH = {k: tuple(best[k]) for k in ("forward", "dq", "dkdv")}
        batch = 128 if size == "ml1m" else 16
        out[size] = {"launch": tiled_attention.LAUNCH,
                     "bf16": check.case(batch, length, 4, 64, torch.bfloat16, 0.1, seed=2, device="cuda")}
    tiled_attention.LAUNCH = {k: tuple(v) for k, v in out["ml1m"]["launch"].items()}
    out["model_tiled"] = check.model_case("cuda", "inductor", "efficient", length=200)
    print(json.dumps(out, default=list))


if __name__ == "__main__":
    main()
