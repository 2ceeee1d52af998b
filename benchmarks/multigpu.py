"""DDP scaling of one trial through Ray Train: samples/s at 1, 2, ... GPUs (issue 10).

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --gpus 1 2 4 --sizes 430M 130M --out OUT/run.json
    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --gpus 4 --sizes 430M --steps 6 --profile OUT
    python benchmarks/multigpu_report.py --scaling OUT/run.json ...   # results/multigpu.json

Each configuration is one `TorchTrainer` with N GPU workers (NCCL); every worker runs the same
training step as `tuner bench` (real collate path, AMP bf16 + torch.compile, optimizer step)
wrapped in DistributedDataParallel, on its own random histories, with the per-GPU batch fixed
(weak scaling: 256 for 130M, 128 for 430M; catalog 159,750, sequence 50). Rank 0's median
window time gives samples/s = N x batch / step time; efficiency = samples/s at N GPUs /
(N x samples/s at 1 GPU), all measured in the same run. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0) because it can take a shared host's GPUs out of service.

The ranks share the initial weights and draw their own batches. Each row says whether every
rank ended with the same weights (`ranks_agree`, from `tuner.train.parallel.weights_digest`).
`--graphs` runs the step under CUDA graphs (static shapes + reduce-overhead), `--ddp-single` wraps
the 1-GPU rows in DDP too (DDP's own cost, with nothing to wait for), `--bucket-mb` sets
DDP's bucket size and `--bucket-view` keeps the gradients in DDP's buckets. `--profile DIR`
profiles rank 0's steps instead of timing them (where a DDP step's time goes: NCCL kernels, gaps).
The CPU run (`--device cpu`) is a gloo smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BATCH = {"tiny": 32, "5M": 256, "85M": 256, "130M": 256, "430M": 128}


def worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from tuner.bench import BenchSpec, run_bench

    ctx = ray.train.get_context()
    cuda = config["device"] == "cuda"
    device = ray.train.torch.get_device() if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    graphs = config["graphs"] and cuda
    spec = BenchSpec(size=config["size"], num_items=config["num_items"], batch_size=config["batch"], seq_len=50,
                     steps=config["steps"], warmup=config["warmup"], amp=cuda, compile=cuda,
                     compile_mode="reduce-overhead" if graphs else "default", static_shapes=graphs,
                     device=config["device"], seed=rank, model_seed=0)  # same weights, own data
    bucket = {"bucket_cap_mb": config["bucket_mb"]} if config["bucket_mb"] else {}
    if config["bucket_view"]:
        bucket["gradient_as_bucket_view"] = True  # gradients live in DDP's buckets: no copy in or out

    def wrap(module):
        if world == 1 and not config["ddp_single"]:
            return module
        # as tuner.train.driver: the buffers (dropout rates, item log-frequencies) are equal on every rank
        return DistributedDataParallel(module, device_ids=[device.index] if cuda else None, broadcast_buffers=False,
                                       **bucket)

    if config["profile"]:
        profile_step(spec, device, wrap, rank, world, Path(config["profile"]), config["benchmarks"])
        ray.train.report({"done": 1})
        return
    result = run_bench(spec, device=device, wrap=wrap, peak_tflops=1.0)
    # DDP must leave every rank with the same weights (bf16 weights: each rank's optimizer keeps
    # its own masters; CUDA graphs: the all-reduce must be replayed too): a fast step that lets the
    # ranks drift apart is not a DDP step
    digests = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(digests, result["weights_digest"])
    if rank == 0:
        out = Path(config["out"])
        out.write_text(json.dumps({"step_ms": result["step_ms"], "peak_mem_mb": result["peak_mem_mb"],
                                   "tflop_per_step_per_gpu": result["model_tflop_per_step"],
                                   "ranks_agree": len(set(digests)) == 1}))
    ray.train.report({"done": 1})


def profile_step(spec, device, wrap, rank: int, world: int, out_dir: Path, benchmarks: str) -> None:
    """PyTorch profiler over `spec.steps` DDP steps after `spec.warmup` (gpu_throughput.py's
    profile_steps): rank 0 writes GPU time by kind of kernel (NCCL's all-reduces on their own stream
    included), the operator tables and a Chrome trace (gzipped) to `out_dir`; the other ranks run
    the same steps unrecorded."""
    import torch

    from tuner.bench import prepare_bench

    sys.path.insert(0, benchmarks)
    from gpu_throughput import profile_steps, write_profile

    bench = prepare_bench(spec, device, wrap)
    warm = max(spec.warmup, 1)
    prof, wall_ms = profile_steps(bench.step, [b.to(device) for b in bench.batches], warm, record=rank == 0)
    if rank != 0:
        return
    steps = len(bench.batches) - warm
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"profile_ddp_{spec.size}_{world}gpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = (f"# {world} x {name}, torch {torch.__version__}, rank 0; {steps} steps of {spec.size} "
            f"(batch {spec.batch_size} per GPU) under the profiler, {wall_ms:.1f} ms per step of wall time\n")
    write_profile(prof, stem, head, steps, cuda=device.type == "cuda")


def run_one(size: str, gpus: int, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        trainer = TorchTrainer(worker, train_loop_config={"size": size, "num_items": args.num_items,
                                                          "batch": BATCH[size], "steps": args.steps,
                                                          "warmup": args.warmup, "out": str(out),
                                                          "device": args.device, "graphs": args.graphs,
                                                          "bucket_mb": args.bucket_mb,
                                                          "bucket_view": args.bucket_view,
                                                          "ddp_single": args.ddp_single,
                                                          "profile": args.profile and str(Path(args.profile).resolve()),
                                                          "benchmarks": str(Path(__file__).resolve().parent)},
                               scaling_config=ScalingConfig(num_workers=gpus, use_gpu=args.device == "cuda",
                                                            resources_per_worker={"CPU": 1, **(
                                                                {"GPU": 1} if args.device == "cuda" else {})}),
                               run_config=RunConfig(name=f"ddp-{size}-{gpus}", storage_path=tmp))
        t0 = time.perf_counter()
        trainer.fit()
        if args.profile:
            return {"size": size, "gpus": gpus,
                    "profile": str(Path(args.profile) / f"profile_ddp_{size}_{gpus}gpu.txt"),
                    "wall_s": time.perf_counter() - t0}
        r = json.loads(out.read_text())
    step_s = r["step_ms"] / 1e3
    return {"size": size, "gpus": gpus, "batch_per_gpu": BATCH[size], "step_ms": r["step_ms"],
            "samples_per_s": gpus * BATCH[size] / step_s, "peak_mem_mb_rank0": r["peak_mem_mb"],
            "ranks_agree": r["ranks_agree"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["130M", "430M"])
    parser.add_argument("--num-items", type=int, default=159_750)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a gloo smoke test")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA graphs: train.compile_mode=reduce-overhead with static shapes (no effect on cpu)")
    parser.add_argument("--bucket-mb", type=float, default=0.0, help="DDP bucket_cap_mb (0: DDP's default, 25)")
    parser.add_argument("--bucket-view", action="store_true", help="DDP gradient_as_bucket_view=True")
    parser.add_argument("--ddp-single", action="store_true",
                        help="wrap the 1-GPU rows in DDP too: what DDP costs without any communication to wait for")
    parser.add_argument("--profile", metavar="DIR", help="instead of timing: profile --steps steps on rank 0 "
                        "and write profile_ddp_SIZE_NGPU.txt and .json.gz (a Chrome trace) to DIR")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "multigpu_runs" / "run.json"),
                        help="this run's rows (benchmarks/multigpu_report.py makes results/multigpu.json from runs)")
    args = parser.parse_args()
    if 0 < args.bucket_mb < 1:  # DDP's first bucket is 1 MB, and compiled DDP asserts it is the smallest
        sys.exit(f"multigpu.py: --bucket-mb {args.bucket_mb:g} is below DDP's 1 MB first bucket; pass 0 or at least 1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import ray
    import torch

    have = torch.cuda.device_count() if args.device == "cuda" else max(args.gpus)
    ray.init(num_cpus=max(4, 2 * have), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        for size in args.sizes:
            for gpus in args.gpus:
                if gpus > have:
                    print(f"skip {size} x {gpus}: only {have} GPUs", file=sys.stderr)
                    continue
                row = run_one(size, gpus, args)
                if args.profile:
                    print(json.dumps(row), flush=True)
                    continue
                base = next((r for r in rows if r["size"] == size and r["gpus"] == 1), None)
                row["scaling_efficiency"] = row["samples_per_s"] / (gpus * base["samples_per_s"]) if base else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    if args.profile:
        return
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    result = {"device": f"{have} x {name}",
              "torch": torch.__version__, "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"],
              "num_items": args.num_items, "seq_len": 50,
              "compile": "reduce-overhead, static shapes" if args.graphs and args.device == "cuda" else "default",
              "bucket_cap_mb": args.bucket_mb or 25,
              "gradient_as_bucket_view": args.bucket_view, "ddp_at_1_gpu": args.ddp_single,
              "command": " ".join(["python"] + sys.argv), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
