"""Training variants on MovieLens-1M, each against the plain run, in groups:

- `seed` (issue 11): the seed project's options: focal loss, an embedding learning-rate
  multiplier, memory release between epochs (`benchmarks/seed_options.py` runs this group);
- `losses` (issue 6): full cross-entropy against cut cross-entropy (exact: should match within
  noise), the sampled losses (CE-, CCE-: the gap is the figure), and a second seed of the plain
  run to show the noise;
- `refit` (issue 8): the same epochs with the validation items held out (best epoch by
  validation) against `train.refit` (trained on them, final weights tested);
- `model` (issue 8): the share of last-item-only samples and the depth, which the ML-1M search
  space does not cover;
- `ema` (issue 8): the weights' exponential moving average validated and tested instead of the
  weights (`optim.ema_decay`);
- `window` (issue 8): histories longer than the model's length trained on a random window of it
  for a share of them each epoch (`train.window_prob`), rather than always on the latest items;
- `weights` (issue 5): bf16 weights with fp32 masters in the optimizer (`train.weights=bf16`)
  against fp32 weights, and bf16 moments (`optim.moments=bf16`) on top, two seeds each (a GPU:
  bf16 autocast);
- `add_norm` (issue 5): `tuner/model/add_norm.py`'s kernels (each residual add, its dropout and
  the next LayerNorm in one Triton kernel each way; on by default under CUDA graphs, as the
  ML-1M settings use) against inductor's code for the same ops, two seeds each (a GPU);
- `step_graph` (issue 5): the whole step as one CUDA graph (`train.step_graph`, on by default
  under the ML-1M settings' CUDA graphs) against inductor's graphs of the forward and backward
  alone, two seeds each (a GPU);
- `defaults` (issue 5): the default GPU trial since session 34 (`train.static_shapes=auto`: fixed
  shapes and the step graph) against the one before (`train.static_shapes=false`: plain compile),
  both in the plain compile mode, and the two steps between them (`fixed_shapes`: static shapes
  without the step graph; `graph_inductor_norm`: the step graph with `model.fused_add_norm=off`),
  seeds 0-23 (a GPU);
- `fp16_stream` (issue 5): fp16 autocast with its GradScaler (a V100's step, on any GPU) with the
  residual stream in fp16 (`model.residual=half`, on add_norm's kernels where they run) against
  the fp32 stream fp16 runs had before, seeds 0-7 (a GPU);
- `attention` (issue 5): the Triton short-sequence attention kernel (`model.attention=triton`)
  against SDPA's memory-efficient kernel, two seeds each, at length 100 (the kernel takes up to
  128; the tuned 200 falls back to SDPA).

Every variant is one `tuner train` on ../shared/data/ml-1m with the same seed and settings but
the option; the table reports test NDCG@10 / HR@10 (full ranking minus the history), the best
epoch, the median training throughput, wall time and peak memory. One run per variant: the
differences below ~0.005 NDCG@10 are within the noise of a seed.

    # 2-core CPU, a short protocol (the `bert4rec` size: hidden 64, 2 layers, length 200)
    python benchmarks/seed_options.py --device cpu --epochs 30 --out benchmarks/results/seed_options.json
    python benchmarks/ml1m_variants.py --group losses --device cpu --epochs 30 --out benchmarks/results/ml1m_losses.json
    # a GPU, the tuned ML-1M settings of benchmarks/ml1m.yaml
    python benchmarks/seed_options.py --device cuda --config benchmarks/ml1m.yaml --epochs 150 \
        --out OUT/seed_options.json

Results are written after every variant, so a time limit keeps what finished. `--parallel N`
runs N variants at once (sharing the device, so their samples/s and wall times are shared ones;
the file records N). `--timeout S` kills a variant's process still running after S seconds and
keeps its row as an error. `--stamp KEY=VALUE` adds a field to every row: the session, code
commit and device call, where rows of several runs will be read together
(`render_tables.paired_table` takes a glob of files).

    # a GPU, eight processes at once: seeds 0-3 of the default trial against before
    python benchmarks/ml1m_variants.py --group defaults --device cuda --config benchmarks/ml1m.yaml \
        --epochs 200 --set optim.lr=3.716e-3 --set model.dropout=0.222 --set optim.weight_decay=0.0559 \
        --set train.mask_prob=0.342 --set train.window_prob=0.83 --parallel 8 --stamp session=36 \
        --only default before default_seed1 before_seed1 default_seed2 before_seed2 default_seed3 before_seed3 \
        --out OUT/defaults_call1.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

from paths import ROOT, ml1m_default


def _seeds(count: int) -> list[tuple[str, list[str]]]:
    """(name suffix, overrides) of seeds 0..count-1: seed 0 is the config's own, unnamed."""
    return [("", []), *((f"_seed{k}", [f"train.seed={k}"]) for k in range(1, count))]


GROUPS = {
    "seed": {
        "plain": [],
        "focal_gamma2": ["train.loss=focal", "train.focal_gamma=2.0"],
        "embedding_lr_x2": ["optim.embedding_lr_mult=2.0"],
        "embedding_lr_x0.5": ["optim.embedding_lr_mult=0.5"],
        "release_memory": ["train.release_memory=true"],
    },
    "losses": {  # ML-1M has 3,416 items: 256 negatives are 7.5% of the catalog
        "ce": ["train.loss=ce"],
        "ce_seed1": ["train.loss=ce", "train.seed=1"],
        "cce": ["train.loss=cce", "train.loss_chunk=1024"],
        "sampled_ce_uniform_256": ["train.loss=sampled_ce", "train.num_negatives=256"],
        "sampled_ce_popularity_256": ["train.loss=sampled_ce", "train.num_negatives=256",
                                      "train.negative_sampling=popularity"],
        "cce_sampled_256": ["train.loss=cce_sampled", "train.num_negatives=256"],
    },
    "refit": {  # the final model: the best-by-validation weights against a refit on the validation items
        "held_out_validation": [],
        "refit": ["train.refit=true"],
        "held_out_validation_seed1": ["train.seed=1"],
        "refit_seed1": ["train.refit=true", "train.seed=1"],
    },
    "model": {  # what the ML-1M search does not cover yet: last-item-only samples, depth
        "plain": [],
        "last_item_0": ["train.last_item_prob=0.0"],
        "last_item_0.3": ["train.last_item_prob=0.3"],
        "layers_3": ["model.layers=3"],
    },
    "ema": {  # validating and testing a moving average of the weights (optim.ema_decay)
        "plain": [],
        "ema_0.99": ["optim.ema_decay=0.99"],
        "ema_0.999": ["optim.ema_decay=0.999"],
    },
    "window": {  # histories longer than max_len trained on random windows too (train.window_prob)
        "plain": [],
        "window_0.5": ["train.window_prob=0.5"],
        "window_1": ["train.window_prob=1.0"],
    },
    "weights": {  # how the weights are stored: bf16 + fp32 masters, or fp32 (auto picks it for this small model)
        "fp32_weights": ["train.weights=fp32"],
        "bf16_weights": ["train.weights=bf16"],
        "fp32_weights_seed1": ["train.weights=fp32", "train.seed=1"],
        "bf16_weights_seed1": ["train.weights=bf16", "train.seed=1"],
        "bf16_moments": ["train.weights=bf16", "optim.moments=bf16"],
        "bf16_moments_seed1": ["train.weights=bf16", "optim.moments=bf16", "train.seed=1"],
    },
    # bf16 weights (the 430M setup): the loss on inductor's code or tuner.ce_kernel, and the residual stream in bf16
    "stream": {
        **{f"torch_ce{seed}": ["train.weights=bf16", "train.loss_kernel=torch", *extra]
           for seed, extra in _seeds(2)},
        **{f"ce_kernel{seed}": ["train.weights=bf16", *extra]
           for seed, extra in _seeds(2)},
        **{f"bf16_residual{seed}": ["train.weights=bf16", "model.residual=bf16", *extra]
           for seed, extra in _seeds(2)},
    },
    "add_norm": {  # the residual add, dropout and LayerNorm as one Triton kernel each way, against inductor's code
        **{f"{name}{seed}": [f"model.fused_add_norm={value}", *extra]
           for seed, extra in _seeds(2)
           for name, value in (("kernels", "on"), ("inductor", "off"))},
    },
    "step_graph": {  # the whole step as one CUDA graph (the default under the graph settings) against inductor's graphs
        **{f"{name}{seed}": [f"train.step_graph={value}", *extra]
           for seed, extra in _seeds(2)
           for name, value in (("step_graph", "auto"), ("no_step_graph", "off"))},
    },
    # the trial a user gets without settings since session 34 (static shapes and the step graph on
    # their own, plain compile mode) against before (plain compile, each batch as it comes), and the
    # two steps between them: fixed shapes alone (no step graph, so inductor's add/norm code), and
    # the step graph with inductor's add/norm code in place of tuner/model/add_norm.py's kernels
    "defaults": {
        **{f"{name}{seed}": ["train.compile_mode=default", *arm, *extra]
           for seed, extra in _seeds(24)
           for name, arm in (("default", ["train.static_shapes=auto"]), ("before", ["train.static_shapes=false"]),
                             ("fixed_shapes", ["train.static_shapes=true", "train.step_graph=off"]),
                             ("graph_inductor_norm", ["train.static_shapes=auto", "model.fused_add_norm=off"]))},
    },
    # fp16 autocast (a V100's dtype) with the residual stream in fp16 against fp32 (what model.residual=bf16 leaves it)
    "fp16_stream": {
        **{f"{name}{seed}": ["train.amp=fp16", f"model.residual={value}", *extra]
           for seed, extra in _seeds(8)
           for name, value in (("fp16_half_stream", "half"), ("fp16_fp32_stream", "fp32"))},
    },
    "attention": {  # the Triton short-sequence kernel against SDPA's, at a length it takes (<= 128)
        "efficient": ["model.attention=efficient", "model.max_len=100"],
        "triton": ["model.attention=triton", "model.max_len=100"],
        "efficient_seed1": ["model.attention=efficient", "model.max_len=100", "train.seed=1"],
        "triton_seed1": ["model.attention=triton", "model.max_len=100", "train.seed=1"],
    },
}
KEYS = ("test_ndcg_10", "test_hr_10", "val_ndcg_10", "best_epoch", "epochs", "samples_per_s", "peak_mem_mb", "wall_s",
        "step_graph", "static_shapes")  # the last two: what the run's settings came to on its device
RESERVED = ("variant", "overrides", "rc", "started", "process_s", "error", *KEYS)  # a row's own fields, not --stamp's


def main(group: str | None = None) -> None:
    """Run one group of variants; `group` fixes it (a wrapper script), else `--group` picks it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if group is None:
        parser.add_argument("--group", choices=sorted(GROUPS), required=True)
    parser.add_argument("--data", default=ml1m_default())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--config", help="YAML of fixed settings (default: the bert4rec size's)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every variant")
    parser.add_argument("--only", nargs="*", metavar="VARIANT", choices=sorted({v for g in GROUPS.values() for v in g}),
                        help="run these variants of the group only")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="variants run at once (default 1)")
    parser.add_argument("--timeout", type=float, metavar="S", help="kill a variant's process after S seconds")
    parser.add_argument("--stamp", action="append", default=[], metavar="KEY=VALUE",
                        help="a field added to every row (e.g. session=36)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    variants = GROUPS[group or args.group]
    script = Path(sys.argv[0]).name
    if not Path(args.data).exists():
        sys.exit(f"{script}: no ML-1M file at {args.data} (pass --data)")
    if args.parallel < 1:
        sys.exit(f"{script}: --parallel {args.parallel}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        sys.exit(f"{script}: --timeout {args.timeout:g}: must be positive")
    stamp = parse_stamps(args.stamp, script)
    if args.only and not set(args.only) <= set(variants):
        sys.exit(f"{script}: --only {' '.join(sorted(set(args.only) - set(variants)))}: not in this group "
                 f"({', '.join(variants)})")
    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    base = [sys.executable, "-m", "tuner", "train", "--data", args.data, "--device", args.device,
            "--max-epochs", str(args.epochs), "--json", "--set", "train.patience=0",
            "--set", "eval.exclude_history=true"]
    base += ["--config", args.config] if args.config else ["--size", "bert4rec"]
    for pair in args.set:
        base += ["--set", pair]
    result = {"device": device, "torch": torch.__version__, "epochs": args.epochs, "parallel": args.parallel,
              "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = {name: overrides for name, overrides in variants.items() if not args.only or name in args.only}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = [pool.submit(run_variant, base, name, overrides, args.timeout) for name, overrides in chosen.items()]
        for done in as_completed(runs):  # each row as its process ends, so a time limit keeps what finished
            row = done.result() | stamp
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(result, indent=1))


def run_variant(base: list[str], name: str, overrides: list[str], timeout: Optional[float] = None) -> dict:
    """One `tuner train` process with the variant's overrides: its row (the final metrics, or the
    error's last line). A process still running after `timeout` seconds is killed (rc -9)."""
    cmd = base + [x for pair in overrides for x in ("--set", pair)]
    row = {"variant": name, "overrides": overrides, "started": time.time()}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return row | {"rc": -9, "process_s": time.time() - row["started"],
                      "error": [f"killed after the --timeout of {timeout:g} s"]}
    row |= {"rc": proc.returncode, "process_s": time.time() - row["started"]}
    if proc.returncode == 0:
        final = json.loads(proc.stdout.strip().splitlines()[-1])
        row |= {k: final.get(k) for k in KEYS}
    else:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["?"]
    return row


def parse_stamps(pairs: list[str], script: str) -> dict:
    """`--stamp KEY=VALUE` pairs -> {KEY: VALUE}, whole numbers as ints (a session's number)."""
    stamp = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key in RESERVED:
            sys.exit(f"{script}: --stamp {pair}: expected KEY=VALUE, KEY not a result field")
        stamp[key] = int(value) if value.isdigit() else value
    return stamp


if __name__ == "__main__":
    main()
