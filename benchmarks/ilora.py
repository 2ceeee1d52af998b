"""iLoRA on the GPU (issue 7): step time and memory, and accuracy on MovieLens-1M.

    python benchmarks/ilora.py speed --out benchmarks/results/ilora.json
    python benchmarks/ilora.py ml1m --out benchmarks/results/ilora_ml1m.json [--data PATH]

`speed`: `tuner bench` at the seed's settings (catalog 159,750, sequence 50; batch 256 for 130M,
128 for 430M) for full fine-tuning and iLoRA (r=8, K=4, history router; also the encoder router
once), each with AMP (bf16) and AMP + torch.compile: median step time, peak memory, trainable
parameters (the encoder router without compile only). All rows in one process, so ratios compare like with like.

`ml1m`: a BERT4Rec (hidden 256, the ML-1M benchmark's architecture) is pre-trained for
`--pretrain-epochs` and deliberately stopped early; from its checkpoint, full fine-tuning and
iLoRA fine-tuning then train for the same `--finetune-epochs` side by side on the same GPU. Test
NDCG@10 of base, full and iLoRA (full ranking, history excluded) and the share of the full
fine-tuning gain that iLoRA recovers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from paths import ML1M, ROOT

BATCH = {"130M": 256, "430M": 128}
EXTRA: list[str] = []  # --set pairs for every `tuner train` of `ml1m` (e.g. a small model for a smoke test)


def speed(args) -> None:
    import torch

    from tuner.bench import BenchSpec, matmul_tflops, run_bench

    peak = matmul_tflops(torch.device("cuda"))
    rows = []
    variants = [("full", False, ()), ("ilora", True, ())]
    for size in args.sizes:
        for name, ilora, extra in variants + ([("ilora-encoder-router", True, ("ilora.router=encoder",))]
                                             if size == args.sizes[0] else []):
            for compile_ in ((False,) if name == "ilora-encoder-router" else (False, True)):
                spec = BenchSpec(size=size, num_items=159_750, batch_size=BATCH[size], seq_len=50, steps=args.steps,
                                 warmup=args.warmup, amp=True, compile=compile_, device="cuda", ilora=ilora,
                                 overrides=extra)
                torch.cuda.empty_cache()
                r = run_bench(spec, peak_tflops=peak)
                rows.append({"size": size, "variant": name, "compile": compile_, "step_ms": r["step_ms"],
                             "samples_per_s": r["samples_per_s"], "peak_mem_mb": r["peak_mem_mb"],
                             "trainable_params": r["trainable_params"], "total_params": r["total_params"]})
                print(json.dumps(rows[-1]), flush=True)
                torch._dynamo.reset()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "num_items": 159_750,
           "seq_len": 50, "amp": "bf16", "command": " ".join(["python"] + sys.argv), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def _train(extra: list[str], data: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tuner", "train", "--data", data, "--config", "benchmarks/ml1m.yaml", "--json",
           "--set", "tracking.tracking_uri=sqlite:////tmp/ilora-ml1m.db", *extra, *EXTRA]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def ml1m(args) -> None:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "pretrained"
    base = _result(_train(["--max-epochs", str(args.pretrain_epochs), "--checkpoint-dir", str(ckpt),
                           "--set", f"optim.lr={args.lr}"], args.data, work / "pretrain.log"), "pre-training")
    epochs = ["--max-epochs", str(args.finetune_epochs), "--init-from", str(ckpt)]
    full = _train(epochs + ["--set", f"optim.lr={args.lr}", "--set", "optim.warmup_fraction=0"], args.data,
                  work / "full.log")
    ilora = _train(epochs + ["--ilora", "--set", f"optim.lr={args.ilora_lr}", "--set", "optim.warmup_fraction=0"],
                   args.data, work / "ilora.log")
    full_r, ilora_r = _result(full, "full fine-tuning"), _result(ilora, "iLoRA fine-tuning")
    keys = ("test_ndcg_10", "test_hr_10", "trainable_params", "total_params", "samples_per_s", "peak_mem_mb", "wall_s",
            "best_epoch")
    pick = lambda r: {k: r[k] for k in keys if k in r}
    gain = full_r["test_ndcg_10"] - base["test_ndcg_10"]
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "command": " ".join(["python"] + sys.argv), "config": "benchmarks/ml1m.yaml (hidden 256, history excluded)",
           "pretrain_epochs": args.pretrain_epochs, "finetune_epochs": args.finetune_epochs,
           "lr_full": args.lr, "lr_ilora": args.ilora_lr,
           "base": pick(base), "full_finetune": pick(full_r), "ilora_finetune": pick(ilora_r),
           "ilora_over_full_ndcg_10": ilora_r["test_ndcg_10"] / full_r["test_ndcg_10"],
           "gain_recovered": (ilora_r["test_ndcg_10"] - base["test_ndcg_10"]) / gain if gain > 0 else None}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--sizes", nargs="+", default=["130M", "430M"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ilora.json"))
    p = sub.add_parser("ml1m")
    p.add_argument("--data", default=str(ML1M))
    p.add_argument("--work", default="/tmp/ilora-ml1m")
    p.add_argument("--pretrain-epochs", type=int, default=40)
    p.add_argument("--finetune-epochs", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ilora-lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ilora_ml1m.json"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    for pair in getattr(args, "set", []):
        EXTRA.extend(["--set", pair])
    speed(args) if args.cmd == "speed" else ml1m(args)


if __name__ == "__main__":
    main()
