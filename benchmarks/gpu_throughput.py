"""GPU training throughput per model size, ours against the seed project's step, in one run.

For each size at the seed's settings (catalog 159,750 items, sequence 50, batch 256; 128 for
430M): our step (tuner.bench: the loop's TrainStep on batches from the real collate path) in
fp32 eager, bf16 AMP, and AMP + torch.compile; and the seed's architecture
(benchmarks/seed_reference.py) in fp32, fp16 AMP and AMP + compile on the same batches. Reports
median step time, samples/s, peak memory and MFU (model FLOPs / step time / the bf16 matmul rate
measured in this run), plus full-ranking evaluation throughput. Results are written after every
row to benchmarks/results/gpu_throughput.json (or --output).

    python benchmarks/gpu_throughput.py --sizes 130M 430M
    # aligned logit columns (the default) against logits as wide as the catalog, and the CCE kernels
    python benchmarks/gpu_throughput.py --sizes 430M --seed-variants amp_compile \
        --variants amp_compile_graphs amp_compile_graphs_unaligned amp_compile_graphs_cce
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seed_reference import bench_seed  # noqa: E402

from tuner import ce_kernel  # noqa: E402
from tuner.bench import BenchSpec, matmul_tflops, prepare_bench, random_sequences, run_bench  # noqa: E402
from tuner.data.collate import IGNORE, train_batches  # noqa: E402
from tuner.data.dataset import EvalSplit  # noqa: E402
from tuner.model import add_norm  # noqa: E402
from tuner.model.sizes import SIZES  # noqa: E402

NUM_ITEMS = 159_750
# variant -> torch.compile mode; amp_compile_graphs also fixes batch shapes so CUDA graphs replay
COMPILE_MODES = {"amp_compile": "default", "amp_compile_autotune": "max-autotune-no-cudagraphs",
                 "amp_compile_graphs": "reduce-overhead", "amp_compile_autotune_graphs": "max-autotune"}
# a variant name may end in these, each changing one thing against its base variant in the same run
SUFFIXES = {"_unaligned": {"overrides": ("train.logit_align=1",)},  # logits as wide as the catalog
            "_align8": {"overrides": ("train.logit_align=8",)},  # 16-byte rows only (the default since 23b4012)
            "_align64": {"overrides": ("train.logit_align=64",)},  # the default before
            "_cce": {"loss": "cce"},  # cut cross-entropy kernels instead of full logits
            "_noclip": {"overrides": ("optim.grad_clip=0",)},  # what gradient clipping costs
            "_separate_clip": {"overrides": ("optim.fused_clip=false",)},  # clipping in a pass of its own
            # the table's two gradients summed by autograd
            "_unfused_table": {"overrides": ("train.fused_table=false",)},
            "_unfused_qkv": {"overrides": ("model.fused_qkv=false",)},  # Q, K and V as three GEMMs
            "_fp32_weights": {"overrides": ("train.weights=fp32",)},  # fp32 weights cast by autocast, fused AdamW
            "_fp32_masters": {"overrides": ("optim.masters=fp32",)},  # whole fp32 masters, not bf16 weight + low half
            "_bf16_moments": {"overrides": ("optim.moments=bf16",)},  # AdamW's moments in bf16 (stochastic rounding)
            # the residual stream in bf16 (the default since 2026-11-24)
            "_bf16_residual": {"overrides": ("model.residual=bf16",)},
            "_fp32_residual": {"overrides": ("model.residual=fp32",)},  # the residual stream in fp32 (autocast's)
            # inductor's softmax passes, not tuner.ce_kernel's
            "_torch_ce": {"overrides": ("train.loss_kernel=torch",)},
            # residual dropout + add + LayerNorm as inductor's kernels, not tuner.model.add_norm's
            "_unfused_add_norm": {"overrides": ("model.fused_add_norm=off",)},
            "_fused_add_norm": {"overrides": ("model.fused_add_norm=on",)},  # also without CUDA graphs
            # layer-norm backward: inductor's mix-order reduction off, or with this many rows per partial sum
            "_no_mix_order": {"inductor": (("triton.mix_order_reduction", False),)},
            # inductor's wrapper in C++ or Python (auto: C++ without CUDA graphs), train.cpp_wrapper
            "_cpp_wrapper": {"overrides": ("train.cpp_wrapper=on",)},
            # the last block's output projection and feed-forward at every position, not the scored ones
            "_full_last_layer": {"overrides": ("model.prune_last_layer=false",)},
            "_python_wrapper": {"overrides": ("train.cpp_wrapper=off",)},
            # the whole step as one CUDA graph (train.step_graph; auto: on for the _graphs variants),
            # or inductor's graphs of the forward and backward only, the rest of the step issued by the host
            "_step_graph": {"overrides": ("train.step_graph=on",)},
            "_no_step_graph": {"overrides": ("train.step_graph=off",)},
            # fp16 autocast with its GradScaler (a V100's step) on a GPU that has bf16, fp32 weights
            "_fp16": {"overrides": ("train.amp=fp16",)},
            # the residual stream in autocast's dtype, fp16 included (model.residual=half), after _fp16
            "_half_residual": {"overrides": ("model.residual=half",)},
            **{f"_mix_split{n}": {"inductor": (("triton.mix_order_reduction_split_size", n),)} for n in (32, 64)},
            **{f"_attn_{name}": {"overrides": (f"model.attention={name}",)}  # a pinned attention kernel
               for name in ("auto", "cudnn", "efficient", "math", "triton")}}

# kernel name patterns -> what the time is spent on (the first match wins), for the profile summary
KERNEL_KINDS = (("NCCL collectives (DDP)", ("nccl",)),
                ("optimizer", ("adam", "triton_for_")),  # fused AdamW; MasterWeightAdamW's foreach kernels
                ("grad norm", ("normfunctor", "lpnorm")),
                # tuner.ce_kernel's passes over the catalog logits; tuner.model.add_norm's kernels
                ("catalog softmax (ce_kernel)", ("_ce_forward", "_ce_backward")),
                ("residual add+norm (add_norm)", ("_add_norm_", "_sum_parts")),
                ("attention", ("sdpa", "fmha", "flash", "attention")),
                ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
                ("embedding backward", ("embedding", "indexing_backward", "radixsort", "sort")),
                ("fused elementwise (inductor)", ("triton_",)),
                ("copies and fills", ("copy", "fill", "elementwise_kernel", "memset", "memcpy")))

def seed_batch_size(size: str) -> int:
    """The seed's batch size at `size`: 128 at 430M, 256 at the others."""
    return 128 if size == "430M" else 256


def variant_spec(variant: str, size: str, batch: int, steps: int, warmup: int) -> BenchSpec:
    base, extra = variant, {"overrides": ()}
    for suffix, kwargs in reversed(SUFFIXES.items()):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            extra = {**extra, **kwargs, "overrides": extra["overrides"] + kwargs.get("overrides", ())}
    if base not in ("fp32", "amp", *COMPILE_MODES):
        sys.exit(f"gpu_throughput.py: unknown variant {variant!r}")
    return BenchSpec(size=size, num_items=NUM_ITEMS, batch_size=batch, seq_len=50, steps=steps, warmup=warmup,
                     amp=base != "fp32", compile=base.startswith("amp_compile"),
                     compile_mode=COMPILE_MODES.get(base, "default"), static_shapes=base.endswith("_graphs"),
                     device="cuda", **extra)


def seed_batches(batch_size: int, seq_len: int, steps: int):
    data = random_sequences(batch_size * steps, seq_len, NUM_ITEMS, seed=0)
    batches = list(train_batches(data, NUM_ITEMS, batch_size, seq_len, 0.2, 0.1, 0, 0, pin_memory=True))
    originals = []
    for b in batches:  # the unmasked ids: the seed's targets at every non-padding position
        orig = b.items.clone().view(-1)
        keep = b.labels != IGNORE
        orig[b.positions[keep]] = b.labels[keep]
        originals.append(orig.view_as(b.items))
    return batches, originals


def eval_throughput(size: str, device: torch.device, users: int = 8192, rounds: int = 3) -> dict:
    """Full-ranking evaluation's users/s (the loop's `evaluate`, bf16), as the service runs it
    (`users_per_s`) and with the last block at every position (`users_per_s_full_last_layer`): the
    median of `rounds` passes each, the two alternating on one model."""
    from tuner.config import load_config
    from tuner.metrics import evaluate
    from tuner.model.bert4rec import Bert4Rec, last_rows
    from tuner.model.build import model_config

    cfg = load_config(overrides=[f"model.size={size}", "model.max_len=50"])
    model = Bert4Rec(model_config(cfg, NUM_ITEMS)).to(device).eval()
    hist = random_sequences(users, 49, NUM_ITEMS, seed=1)
    split = EvalSplit(hist, np.random.default_rng(2).integers(1, NUM_ITEMS + 1, users).astype(np.int32),
                      np.arange(users))

    def encode(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(ids, rows=last_rows(ids))

    weight, bias = model.output_embedding()
    run = lambda: evaluate(encode, weight.detach(), bias.detach(), split, NUM_ITEMS, 50, device, 1024, 65536,
                           sampled=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for prune in (True, False):
            model.cfg.prune_last_layer = prune
            run()  # warm-up at this setting
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize(device)
            times[prune].append(time.perf_counter() - t0)
    model.cfg.prune_last_layer = True
    return {"size": size, "users_per_s": users / statistics.median(times[True]), "eval_batch": 1024,
            "users_per_s_full_last_layer": users / statistics.median(times[False]), "rounds": rounds}


def kernel_summary(prof, steps: int) -> str:
    """GPU time per step by kind of kernel (KERNEL_KINDS), from a profile's kernel events."""
    from torch.autograd import DeviceType

    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or event.is_user_annotation:  # kernels, not the regions around them
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1e3 / steps
    return kinds_text(kinds)


def kernel_kind(name: str) -> str:
    """The KERNEL_KINDS kind of a kernel's name (the first that matches), else "other"."""
    name = name.lower()
    return next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")


def trace_kinds(trace: dict, steps: int) -> str:
    """`kernel_summary` from a saved Chrome trace's kernel, memset and copy events."""
    kinds: dict[str, float] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            kind = kernel_kind(e["name"] if e["cat"] == "kernel" else e["cat"].replace("gpu_", ""))
            kinds[kind] = kinds.get(kind, 0.0) + e["dur"] / 1e3 / steps
    return kinds_text(kinds)


def kinds_text(kinds: dict[str, float]) -> str:
    total = sum(kinds.values())
    lines = [f"GPU time per step by kind of kernel: {total:.2f} ms"]
    lines += [f"  {kind:<30} {ms:6.2f} ms  {ms / total:5.1%}"
              for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n\n"


def profile_steps(step, batches: list, warmup: int, record: bool = True, inductor=()):
    """Runs `step` over `batches`: the first `warmup` unrecorded (compilation happens there, under
    the `inductor` settings), the rest under the PyTorch profiler, or unrecorded where `record` is
    False (the DDP ranks other than 0 must run the same steps). Returns the profile (None when
    unrecorded) and the wall milliseconds per recorded step."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = batches[0].items.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch._inductor.config.patch(dict(inductor)):
        for b in batches[:warmup]:
            step(b)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    recorder = torch_profile(activities=activities, record_shapes=True) if record else contextlib.nullcontext()
    t0 = time.perf_counter()
    with recorder as prof:
        for b in batches[warmup:]:
            step(b)
        sync()
    return prof, (time.perf_counter() - t0) * 1e3 / len(batches[warmup:])


def profile_text(prof, steps: int, cuda: bool = True) -> str:
    """Time per step by kind of kernel (CUDA), then by operator, then by operator and input shape."""
    table = dict(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=60,
                 max_name_column_width=110)
    host = dict(table, sort_by="self_cpu_time_total", row_limit=30)
    return ((kernel_summary(prof, steps) if cuda else "") + prof.key_averages().table(**table)
            + "\n\nBy host time:\n" + prof.key_averages().table(**host)
            + "\n\nBy operator and input shape:\n"
            + prof.key_averages(group_by_input_shape=True).table(**table, max_shapes_column_width=90))


def kernel_timeline(trace: dict, steps: int) -> str:
    """Per step, from a Chrome trace's kernel events (all streams): how many kernels ran, the time
    at least one kernel ran (the union of their intervals) and the time between the first kernel's
    start and the last one's end that no kernel covered (launch gaps, waits); then `gap_summary`."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace.get("traceEvents", [])
                   if e.get("cat") == "kernel" and e.get("ph") == "X")
    if not spans:
        return "No kernel events in the trace.\n\n"
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    idle = end - spans[0][0] - busy
    return (f"Kernel timeline per step: {len(spans) / steps:.0f} kernels, {busy / 1e3 / steps:.2f} ms with a kernel "
            f"running, {idle / 1e3 / steps:.2f} ms between kernels with none running\n"
            + gap_summary(trace, steps) + "\n")


# a gap shorter than this between one GPU operation's end and the next one's start is the GPU's own
# spacing between work already queued (inside a CUDA graph, or launched ahead by the host); longer
# ones are waits for the host, which the profiler's own host work lengthens
SHORT_GAP_US = 5.0


def gap_summary(trace: dict, steps: int) -> str:
    """Per step, the gaps between consecutive GPU operations (kernels, memsets, copies) of a
    Chrome trace: how many are shorter than SHORT_GAP_US and what they add up to, the same for the
    longer ones, and how many operations are memsets (each one more gap)."""
    ops = sorted((e["ts"], e["ts"] + e["dur"], e.get("cat")) for e in trace.get("traceEvents", [])
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"))
    gaps, end = [], ops[0][1] if ops else 0.0
    for start, stop, _ in ops[1:]:  # from the latest end so far: an operation on another stream may overlap
        if start > end:
            gaps.append(start - end)
        end = max(end, stop)
    short = [g for g in gaps if g < SHORT_GAP_US]
    long = [g for g in gaps if g >= SHORT_GAP_US]
    memsets = sum(1 for op in ops if op[2] == "gpu_memset")
    return (f"GPU operations per step: {len(ops) / steps:.0f} ({memsets / steps:.0f} memsets); gaps under "
            f"{SHORT_GAP_US:g} us: {len(short) / steps:.0f}, {sum(short) / 1e3 / steps:.2f} ms; longer gaps: "
            f"{len(long) / steps:.0f}, {sum(long) / 1e3 / steps:.2f} ms\n")


def read_best(path: str, kernels: str, shape):
    """`shape` of a sweep report's `best` entry (an add_norm_kernels.py or ce_kernel_tiles.py
    report), or a one-line exit naming `kernels` when the file has none in that shape."""
    try:
        return shape(json.loads(Path(path).read_text())["best"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"gpu_throughput.py: no {kernels} launch settings in {path}: {exc.__class__.__name__}: {exc}")


def read_add_norm_settings(path: str) -> dict:
    """{size: {"forward": ..., "backward": ...}} from an add_norm_kernels.py report's `best`."""
    return read_best(path, "add_norm", lambda best: {
        size: {"forward": dict(b["forward"]), "backward": dict(b["backward"])} for size, b in best.items()})


def read_ce_settings(path: str) -> tuple[dict, dict]:
    """(forward, backward) launch settings for tuner.ce_kernel from a ce_kernel_tiles.py report's `best`."""
    return read_best(path, "ce_kernel", lambda best: (dict(best["forward"]), dict(best["backward"])))


def use_add_norm_settings(settings: dict | None, defaults: tuple[dict, dict]) -> None:
    """Give tuner.model.add_norm's kernels these launch settings from now on (None: `defaults`,
    the module's FORWARD and BACKWARD as they were before any run changed them)."""
    add_norm.FORWARD, add_norm.BACKWARD = (settings["forward"], settings["backward"]) if settings else defaults


def kernel_calls(trace: dict, steps: int, name: str) -> str:
    """How often per step a kernel named `name` ran in a Chrome trace and how long its calls took
    (us: the shortest, the median, the longest)."""
    durations = sorted(e["dur"] for e in trace.get("traceEvents", [])
                       if e.get("ph") == "X" and e.get("cat") == "kernel" and e.get("name") == name)
    if not durations:
        return f"{name}: no calls\n"
    return (f"{name}: {len(durations) / steps:.1f} calls per step, {durations[0]:.1f} / "
            f"{durations[len(durations) // 2]:.1f} / {durations[-1]:.1f} us (shortest / median / longest)\n")


def read_trace(path) -> dict:
    """A Chrome trace saved gzipped (`write_profile`'s .json.gz)."""
    import gzip

    with gzip.open(path, "rt") as packed:
        return json.load(packed)


def timeline_of(path: Path, steps: int, names: list[str] = ()) -> str:
    """`kernel_timeline` and GPU time by kind of kernel (`trace_kinds`) of a saved trace, and with
    `names` those kernels' calls (`kernel_calls`)."""
    trace = read_trace(path)
    calls = "".join(kernel_calls(trace, steps, name) for name in names)
    return kernel_timeline(trace, steps) + trace_kinds(trace, steps) + calls


def write_profile(prof, stem: Path, head: str, steps: int, cuda: bool = True) -> Path:
    """`stem`.txt (the kernel timeline, `profile_text`'s tables) and `stem`.json.gz (a Chrome
    trace); returns the text file's path."""
    prof.export_chrome_trace(f"{stem}.json.gz")  # the profiler gzips a path ending in .gz itself
    trace = read_trace(f"{stem}.json.gz")
    text = Path(f"{stem}.txt")
    text.write_text(head + (kernel_timeline(trace, steps) if cuda else "") + profile_text(prof, steps, cuda))
    return text


def profile(size: str, out_dir: Path, steps: int = 6, variant: str = "amp_compile") -> Path:
    """PyTorch profiler over training steps of `variant` (AMP+compile by default): where the GPU
    time goes, by kind of kernel, by operator, and by operator and input shape."""
    warmup = 8
    batch = seed_batch_size(size)
    spec = variant_spec(variant, size, batch, steps, warmup)
    device = torch.device("cuda")
    bench = prepare_bench(spec, device)
    prof, _ = profile_steps(bench.step, [b.to(device) for b in bench.batches], warmup, inductor=spec.inductor)
    head = (f"# python benchmarks/gpu_throughput.py --profile {size} --profile-variant {variant}"
            f" on an {torch.cuda.get_device_name(device)}, torch {torch.__version__}; {steps} steps, "
            f"batch {batch}, {NUM_ITEMS:,} items\n")
    return write_profile(prof, out_dir / f"profile_{size}_{variant}", head, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="*", default=["5M", "85M", "130M", "430M"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=["fp32", "amp", "amp_compile", "amp_compile_graphs"],
                        help="our step's variants to time (none: the seed's alone)")
    parser.add_argument("--seed-variants", nargs="*", default=["fp32", "amp", "amp_compile"],
                        help="the seed's variants to time (none: our step alone, without ratios)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gpu_throughput.json"))
    parser.add_argument("--profile", nargs="*", default=[], help="sizes to profile")
    parser.add_argument("--profile-variant", action="append", default=[],
                        help="variant to profile (repeatable; default amp_compile)")
    parser.add_argument("--timeline", metavar="TRACE", help="print the kernel timeline of a saved profile trace "
                        "(profile_*.json.gz; --profile-steps steps in it) and exit")
    parser.add_argument("--profile-steps", type=int, default=6, help="steps in the --timeline trace (default 6)")
    parser.add_argument("--kernel", action="append", default=[], metavar="NAME",
                        help="with --timeline: calls per step and durations of the kernels of this name (repeatable)")
    parser.add_argument("--add-norm-settings", metavar="FILE",
                        help="launch settings for tuner.model.add_norm's kernels from an add_norm_kernels.py report "
                             "(its `best` for each size that has one; the others keep the defaults)")
    parser.add_argument("--ce-settings", metavar="FILE",
                        help="launch settings for tuner.ce_kernel's passes from a ce_kernel_tiles.py report's `best`")
    args = parser.parse_args()
    launch = read_add_norm_settings(args.add_norm_settings) if args.add_norm_settings else {}
    if args.ce_settings:
        ce_kernel.FORWARD, ce_kernel.BACKWARD = read_ce_settings(args.ce_settings)
    add_norm_defaults = add_norm.FORWARD, add_norm.BACKWARD
    if args.profile_steps < 1:
        sys.exit("gpu_throughput.py: --profile-steps must be at least 1")
    if args.timeline:
        try:
            print(timeline_of(Path(args.timeline), args.profile_steps, args.kernel), end="")
        except (OSError, ValueError) as exc:
            sys.exit(f"gpu_throughput.py: cannot read the trace {args.timeline}: {exc}")
        return
    device = torch.device("cuda")
    for size in args.profile:
        use_add_norm_settings(launch.get(size), add_norm_defaults)
        for variant in args.profile_variant or ["amp_compile"]:
            path = profile(size, Path(args.output).parent, variant=variant)
            print(f"profile written to {path}", flush=True)
            torch._dynamo.reset()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    peak = matmul_tflops(device)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "command": "python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:]),
              "num_items": NUM_ITEMS, "seq_len": 50, "matmul_bf16_tflops": peak, "rows": [], "peer_rows": [],
              "eval": []}

    def save():
        out.write_text(json.dumps(report, indent=2) + "\n")

    if launch:
        report["add_norm_settings"] = {"file": args.add_norm_settings, **launch}
    if args.ce_settings:
        report["ce_settings"] = {"file": args.ce_settings, "forward": ce_kernel.FORWARD, "backward": ce_kernel.BACKWARD}
    for size in args.sizes:
        batch = seed_batch_size(size)
        preset = SIZES[size]
        use_add_norm_settings(launch.get(size), add_norm_defaults)
        peer_best = None
        for variant in args.seed_variants:
            batches, originals = seed_batches(batch, 50, args.steps + args.warmup)
            try:
                row = bench_seed(batches, originals, NUM_ITEMS, preset["hidden"], preset["layers"], preset["heads"],
                                 50, device, variant, args.warmup)
            except torch.OutOfMemoryError:
                row = {"step_ms": None, "samples_per_s": None, "peak_mem_mb": None, "error": "out of memory"}
            report["peer_rows"].append({"size": size, "variant": variant, "batch_size": batch, **row})
            if row["samples_per_s"] and (peer_best is None or row["samples_per_s"] > peer_best["samples_per_s"]):
                peer_best = {**row, "variant": variant}
            print(json.dumps(report["peer_rows"][-1]), flush=True)
            del batches, originals
            gc.collect()
            torch.cuda.empty_cache()
            save()
        for variant in args.variants:
            spec = variant_spec(variant, size, batch, args.steps, args.warmup)
            try:
                r = run_bench(spec, peak_tflops=peak)
            except Exception as exc:  # noqa: BLE001 - record the failure, keep measuring the rest
                r = {"step_ms": None, "samples_per_s": None, "peak_mem_mb": None, "mfu": None,
                     "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
            row = {"size": size, "variant": variant, "batch_size": batch, "step_ms": r["step_ms"],
                   "window_ms": r.get("window_ms"), "host_ms": r.get("host_ms"), "warmup_s": r.get("warmup_s"),
                   "samples_per_s": r["samples_per_s"], "peak_mem_mb": r["peak_mem_mb"], "mfu": r.get("mfu"),
                   "peer_samples_per_s": peer_best and peer_best["samples_per_s"],
                   "peer_variant": peer_best and peer_best["variant"],
                   "peer_peak_mem_mb": peer_best and peer_best["peak_mem_mb"],
                   "speedup_vs_peer": (r["samples_per_s"] / peer_best["samples_per_s"])
                   if peer_best and r["samples_per_s"] else None,
                   "total_params": r.get("total_params"), "model_tflop_per_step": r.get("model_tflop_per_step"),
                   "collate_samples_per_s": r.get("collate_samples_per_s"), "error": r.get("error")}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            save()
        report["eval"].append(eval_throughput(size, device))
        print(json.dumps(report["eval"][-1]), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    main()
