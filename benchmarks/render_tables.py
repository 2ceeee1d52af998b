"""Markdown tables for the README from benchmarks/results/*.json (so README figures have a source).

    python benchmarks/render_tables.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def gpu_table(*names: str, full: bool = True) -> str:
    """The gpu_throughput.py table of one results file, or of several files of one run (one process
    per file, each with its own matmul rate and command); `full`: with the seed's rows and evaluation."""
    parts = [json.loads((RESULTS / name).read_text()) for name in names or ("gpu_throughput.json",)]
    data = {**parts[0], **{key: [r for part in parts for r in part[key]] for key in ("rows", "peer_rows", "eval")}}
    code = f" (code {data['code_commit']})" if data.get("code_commit") else ""
    if len(parts) == 1:
        run = f"measured bf16 matmul rate {data['matmul_bf16_tflops']:.0f} TFLOP/s; `{data['command']}`{code}."
    else:
        rates = ", ".join(f"{'/'.join(dict.fromkeys(r['size'] for r in part['rows']))} {part['matmul_bf16_tflops']:.0f}"
                          for part in parts)
        commands = "; ".join(f"`{part['command']}`" for part in parts)
        run = f"one process per file, bf16 matmul rate measured in each (TFLOP/s): {rates}; {commands}{code}."
    lines = [f"Device: {data['device']} (torch {data['torch']}), catalog {data['num_items']:,}, sequence "
             f"{data['seq_len']}; {run}", "",
             "| size | batch | variant | ms/step | samples/s | peak GB | MFU | seed peer (best mode) samples/s | "
             "seed peak GB | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        peak_gb = r["peak_mem_mb"] and r["peak_mem_mb"] / 1024
        lines.append(f"| {r['size']} | {r['batch_size']} | {r['variant']} | {fmt(r['step_ms'], '.1f')} | "
                     f"{fmt(r['samples_per_s'], ',.0f')} | {fmt(peak_gb, '.1f')} | "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | {fmt(r['peer_samples_per_s'], ',.0f')} "
                     f"({r['peer_variant']}) | {fmt(r['peer_peak_mem_mb'] and r['peer_peak_mem_mb'] / 1024, '.1f')} | "
                     f"{fmt(r['speedup_vs_peer'], '.2f')}x |")
    if not full:
        return "\n".join(lines)
    lines += ["", "| size | seed variant | ms/step | samples/s | peak GB |", "|---|---|---|---|---|"]
    for r in data["peer_rows"]:
        if r["step_ms"] is not None:
            lines.append(f"| {r['size']} | {r['variant']} | {r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | "
                         f"{r['peak_mem_mb'] / 1024:.1f} |")
    lines += ["", "| size | full-ranking evaluation, users/s (batch 1024, bf16) |", "|---|---|"]
    for r in data["eval"]:
        lines.append(f"| {r['size']} | {r['users_per_s']:,.0f} |")
    return "\n".join(lines)


def ratio_runs_table(*names: str, size: str = "430M", variant: str = "amp_compile_graphs") -> str:
    """One size and variant of our step in several gpu_throughput.py runs: against the seed's step in
    each run (each ratio measured side by side), then the median of the runs' ratios."""
    lines = ["| run | device | variant | ms/step | seed peer ms/step | MFU | speed-up |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        peers = {(r["size"], r["variant"]): r for r in data["peer_rows"]}
        for r in (r for r in data["rows"] if (r["size"], r["variant"]) == (size, variant)):
            peer = peers[(r["size"], r["peer_variant"])]
            ratios.append(r["speedup_vs_peer"])
            lines.append(f"| {Path(name).stem} (code {data.get('code_commit', '?')}) | {data['device']} | {r['size']} "
                         f"{r['variant']} | {r['step_ms']:.2f} | {peer['step_ms']:.2f} ({r['peer_variant']}) | "
                         f"{100 * r['mfu']:.1f}% | {r['speedup_vs_peer']:.2f}x |")
    lines.append(f"| median of {len(ratios)} runs' ratios | | | | | | **{statistics.median(ratios):.2f}x** |")
    return "\n".join(lines)


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def settings_runs_table(folder: str, size: str = "430M", variant: str = "amp_compile_graphs") -> str:
    """gpu_throughput.py runs in `folder` grouped by what they changed (the `--ce-settings` file and
    the environment a run records): our step's ms per run, and the seed's where the run timed it."""
    groups: dict[tuple[str, str], list] = {}
    for path in sorted((RESULTS / folder).glob("tp_*.json")):
        data = json.loads(path.read_text())
        ce = data.get("ce_settings")  # by the settings themselves: the file may have moved since
        ce = (f"forward {_setting_text(ce['forward'])}; backward {_setting_text(ce['backward'])}" if ce
              else "the defaults of the run's commit")
        key = (ce, data.get("environment", "-"))
        for r in (r for r in data["rows"] if (r["size"], r["variant"]) == (size, variant)):
            seed = ", ".join(f"{p['step_ms']:.2f}" for p in data["peer_rows"] if p["step_ms"])
            groups.setdefault(key, []).append((r["step_ms"], seed, f"{path.stem} (call {data.get('device_call')}, "
                                                                  f"{data.get('code_commit')})"))
    lines = [f"{size} {variant}, ms a step, one run per figure.", "",
             "| catalog softmax settings | environment | our step | the seed's step in the run | runs |",
             "|---|---|---|---|---|"]
    for (ce, env), runs in groups.items():
        lines.append(f"| {ce} | {env} | {', '.join(f'{ms:.3f}' for ms, _, _ in runs)} | "
                     f"{'; '.join(seed or '-' for _, seed, _ in runs)} | {'; '.join(run for _, _, run in runs)} |")
    return "\n".join(lines)


def process_ab_table(*runs: str) -> str:
    """process_ab.py runs (each a folder's process_ab.json): per round, the seed's step and each
    arm's in processes of their own, each arm's ratio to the seed and to the first arm; then the
    medians over every round of every run, by process_ab.py's own summary."""
    from process_ab import median, summarize

    reports = [json.loads((RESULTS / run / "process_ab.json").read_text()) for run in runs]
    first = reports[0]
    arms = list(first["environments"])
    envs = "; ".join(f"{arm}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'as it is'}"
                     for arm, env in first["environments"].items())
    lines = [f"Device: {first['device']} (torch {first['torch']}); {first['size']} {first['variant']} against the "
             f"seed's {first['seed_variant']}, each in a process of its own; environments: {envs}. ms a step.", "",
             "| run | round | seed | " + " | ".join(f"{a} | seed / {a}" for a in arms)
             + "".join(f" | {a} / {arms[0]}" for a in arms[1:]) + " |",
             "|---" * (2 + 1 + 2 * len(arms) + len(arms) - 1) + "|"]
    for run, report in zip(runs, reports):
        for i, r in enumerate(report["rounds"], 1):
            cells = [f"{run} (call {report.get('device_call')}, {report.get('code_commit')})", str(i),
                     f"{r['seed']:.2f}"]
            for a in arms:
                cells += [f"{r[a]:.3f}", f"{r['seed'] / r[a]:.2f}x"]
            cells += [f"{r[a] / r[arms[0]]:.3f}" for a in arms[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    rounds = [r for report in reports for r in report["rounds"]]
    summary = summarize(rounds, arms)
    cells = ["median", f"all {len(rounds)}", f"{summary['seed_median_ms']:.2f}"]
    for a in arms:
        cells += [f"{summary['arms'][a]['median_ms']:.3f}", f"**{summary['arms'][a]['median_speedup_vs_seed']:.2f}x**"]
    cells += [f"**{median(summary['arms'][a][f'step_vs_{arms[0]}']):.3f}**" for a in arms[1:]]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def twin_table(suffix: str, labels: tuple[str, str], names: tuple[str, ...], host: bool = False,
               evals: bool = False) -> str:
    """gpu_throughput.py runs with variants and their `suffix` twins: per run, size and variant,
    our step's ms as is (each time it ran, in order) and as the twin, the ratio of their medians,
    and each against the seed's step of the same run. `host`: also the host's ms to issue a step
    and the peak memory, each side; `evals`: then each run's full-ranking evaluation with the last
    block pruned and at every position (one model, alternating)."""
    a, b = labels
    head = ["run", "size", "variant", f"{a} ms", f"{b} ms", f"{a} / {b}", "seed ms", f"seed / {a}", f"seed / {b}"]
    if host:
        head += [f"host ms, {a}", f"host ms, {b}", f"peak MB, {a}", f"peak MB, {b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rankings = ["| run | size | users/s, pruned | users/s, full | pruned / full |", "|---|---|---|---|---|"]
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        run = f"{Path(name).stem} (call {data.get('device_call')}, {data.get('code_commit')})"
        rows: dict[tuple[str, str, bool], list[dict]] = {}
        for r in data["rows"]:
            # a twin's variant is its base's with `suffix` inserted: at the end, or before a dtype's (_fp16)
            twin = suffix in r["variant"]
            base = r["variant"].replace(suffix, "", 1)
            rows.setdefault((r["size"], base, twin), []).append(r)
        seed = {r["size"]: r["step_ms"] for r in data["peer_rows"]}
        for (size, base, twin), ours in rows.items():
            if twin or (size, base, True) not in rows:
                continue
            theirs = rows[(size, base, True)]
            p, f = (statistics.median(r["step_ms"] for r in side) for side in (ours, theirs))
            cells = [run, size, base, ", ".join(f"{r['step_ms']:.2f}" for r in ours),
                     ", ".join(f"{r['step_ms']:.2f}" for r in theirs), f"{p / f:.3f}"]
            cells += [f"{seed[size]:.1f}", f"{seed[size] / p:.2f}x", f"{seed[size] / f:.2f}x"] if size in seed \
                else ["-", "-", "-"]
            if host:
                cells += [", ".join(f"{r['host_ms']:.2f}" for r in side) for side in (ours, theirs)]
                cells += [f"{statistics.median(r['peak_mem_mb'] for r in side):,.0f}" for side in (ours, theirs)]
            lines.append("| " + " | ".join(cells) + " |")
        for e in data["eval"] if evals else ():
            rankings.append(f"| {run} | {e['size']} | {e['users_per_s']:,.0f} | "
                            f"{e['users_per_s_full_last_layer']:,.0f} | "
                            f"{e['users_per_s'] / e['users_per_s_full_last_layer']:.3f} |")
    first = json.loads((RESULTS / names[0]).read_text())
    head = f"Device: {first['device']} (torch {first['torch']}); ms a step, medians over windows of 5 steps."
    return "\n".join([head, ""] + lines + ([""] + rankings if evals else []))


def prune_table(*names: str) -> str:
    """Session 32: the last block pruned to the scored rows against the whole block."""
    return twin_table("_full_last_layer", ("pruned", "full"), names, evals=True)


def step_graph_table(*names: str) -> str:
    """Session 33: the whole step as one CUDA graph (train.step_graph) against inductor's graphs of
    the forward and backward, the rest issued by the host."""
    return twin_table("_no_step_graph", ("step graph", "inductor's graphs"), names, host=True)


def fp16_step_graph_table(*names: str) -> str:
    """Session 38: fp16 with its GradScaler (a V100's step) as one CUDA graph against inductor's
    graphs alone, and each run's bf16 step (amp_compile_graphs) beside it."""
    return "\n".join([step_graph_table(*names), "", *medians_lines(*names)])


def medians_table(name: str) -> str:
    """A gpu_throughput.py run's device and command, then `medians_lines`: each variant against
    amp_compile_graphs."""
    data = json.loads((RESULTS / name).read_text())
    header = _runs_header([(RESULTS / name, data)]).rstrip(".") + f" (code {data.get('code_commit', '?')})."
    return "\n".join([header, "", *medians_lines(name)])


def medians_lines(*names: str, base: str = "amp_compile_graphs") -> list[str]:
    """One line per gpu_throughput.py run and size: each variant's median ms a step (over the times
    it ran) and its ratio to `base`'s in the same run."""
    lines = []
    for name in names:
        times: dict[str, dict[str, list[float]]] = {}  # size -> variant -> ms a step, each time it ran
        for r in json.loads((RESULTS / name).read_text())["rows"]:
            times.setdefault(r["size"], {}).setdefault(r["variant"], []).append(r["step_ms"])
        for size, by_variant in times.items():
            ms = {variant: statistics.median(runs) for variant, runs in by_variant.items()}
            others = ", ".join(f"{variant} {value:.2f} ({value / ms[base]:.3f}x)"
                               for variant, value in ms.items() if variant != base)
            lines.append(f"- {Path(name).stem}, {size}: {base} {ms[base]:.2f} ms a step; {others}.")
    return lines


def gpu_tables(*runs: str) -> str:
    """The rows of several gpu_throughput_RUN.json files, one table per run (each its own device line)."""
    return "\n\n".join(gpu_table(f"gpu_throughput_{run}.json", full=False) for run in runs)


def windows_table(*runs: str) -> str:
    """gpu_throughput.py runs with each row's timing windows and warm-up (compile) seconds: for
    rows whose step moves with the host, where the median alone hides the spread."""
    out = []
    for run in runs:
        data = json.loads((RESULTS / f"gpu_throughput_{run}.json").read_text())
        peers = ", ".join(f"{r['variant']} {r['step_ms']:.1f} ms" for r in data["peer_rows"] if r["step_ms"])
        lines = [f"Device: {data['device']} (torch {data['torch']}); `{data['command']}` (code "
                 f"{data.get('code_commit', '?')}); the seed's steps: {peers}.", "",
                 "| size | variant | ms/step (median) | 5-step windows, ms | warm-up s | "
                 "speed-up on the seed's best mode in the run |",
                 "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            if r["step_ms"] is None:
                lines.append(f"| {r['size']} | {r['variant']} | failed: {r['error'][:80]} | | | |")
                continue
            windows = ", ".join(f"{w:.1f}" for w in r.get("window_ms") or [])
            warm = f"{r['warmup_s']:.0f}" if r.get("warmup_s") is not None else "-"
            lines.append(f"| {r['size']} | {r['variant']} | {r['step_ms']:.2f} | {windows} | {warm} | "
                         f"{r['speedup_vs_peer']:.2f}x |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def add_norm_table(name: str = "add_norm_kernels.json") -> str:
    """benchmarks/add_norm_kernels.py: inductor's code, add_norm's default settings and the
    fastest setting timed, per shape."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}), bf16, dropout {data['dropout']}; `{data['command']}`"
             f" (code {data.get('code_commit', '?')}).", "",
             "| shape | code | forward us | forward + backward us |", "|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["size"] == size and "error" not in r]
        best = min((r for r in rows if r["impl"] != "inductor"), key=lambda r: r["forward_backward_us"])
        shown = [r for r in rows if r["impl"] in ("inductor", "kernels default")] + [best]
        for r in shown:
            label = r["impl"] if r is not best else f"fastest timed: {r['impl']}"
            lines.append(f"| {size} ({r['rows']:,} x {r['hidden']:,}) | {label} | {r['forward_us']:.1f} | "
                         f"{r['forward_backward_us']:.1f} |")
    return "\n".join(lines)


def large_catalog_table() -> str:
    data = json.loads((RESULTS / "large_catalog.json").read_text())
    ratios = {(r["loss"], r["items"]): r for r in data.get("summary", [])}
    lines = [f"Device: {data['device']} (torch {data['torch']}); `{data['command']}`; loss forward + backward "
             f"alone, hidden 256, bf16 inputs, peak excludes the inputs; sampled losses use "
             f"{data['negatives']:,} shared negatives; ratios against `ce_bf16` of the same run.", "",
             "| items | positions | loss | ms | peak GB | TFLOP/s | speed-up | memory saved |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['items']:,} | {r['rows']:,} | {r['loss']} | {r['error']} | - | - | - | - |")
            continue
        ratio = ratios.get((r["loss"], r["items"]), {})
        speed = f"{ratio['speedup_vs_ce_bf16']:.2f}x" if ratio else "-"
        memory = f"{ratio['memory_ratio_vs_ce_bf16']:.1f}x" if ratio.get("memory_ratio_vs_ce_bf16") else "-"
        tflops = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        lines.append(f"| {r['items']:,} | {r['rows']:,} | {r['loss']} | {r['ms']:.1f} | {r['peak_gb']:.2f} | "
                     f"{tflops} | {speed} | {memory} |")
    check = data.get("check")
    if check:
        lines += ["", f"Error against the fp32 chunked function on the same bf16 inputs ({check['rows']:,} rows, "
                  f"{check['items']:,} items): max relative error", "",
                  "| loss | loss value | grad hidden | grad weight | grad bias |", "|---|---|---|---|---|"]
        for name in ("cce", "ce_bf16"):
            e = check[name]
            lines.append(f"| {name} | {e['loss']:.1e} | {e['grad_hidden']:.1e} | {e['grad_weight']:.1e} | "
                         f"{e['grad_bias']:.1e} |")
    return "\n".join(lines)


def train_step_table() -> str:
    data = json.loads((RESULTS / "cce_train_step.json").read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}); {data['note']}.", "",
             "| items | loss | step ms | samples/s | peak MB | MFU |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['num_items']:,} | {r['loss']} | {r['error']} | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"  # CPU rows have no matmul peak to divide by
        lines.append(f"| {r['num_items']:,} | {r['loss']} | {r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | "
                     f"{r['peak_mem_mb']:,.0f} | {mfu} |")
    return "\n".join(lines)


def ilora_table() -> str:
    data = json.loads((RESULTS / "ilora.json").read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}); catalog {data['num_items']:,}, sequence "
             f"{data['seq_len']}, bf16 autocast; `{data['command']}`.", "",
             "| size | variant | compile | ms/step | samples/s | peak GB | trainable / total params |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['size']} | {r['variant']} | {'on' if r['compile'] else 'off'} | {r['step_ms']:.1f} | "
                     f"{r['samples_per_s']:,.0f} | {r['peak_mem_mb'] / 1024:.2f} | {r['trainable_params']:,} / "
                     f"{r['total_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%) |")
    return "\n".join(lines)


def multigpu_table() -> str:
    from multigpu_report import tables

    return tables(json.loads((RESULTS / "multigpu.json").read_text()))


def inference_table() -> str:
    data = json.loads((RESULTS / "inference.json").read_text())
    lines = ["| device | model, catalog | precision | variant | batch-1 latency ms | histories/s (batch) | "
             "top-10 overlap with eager |", "|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for r in run["rows"]:
            overlap = r.get("top10_overlap_with_eager")
            lines.append(f"| {run['device']} | {run['size']}, {run['num_items']:,} | {run['precision']} | "
                         f"{r['variant']} | {r['batch1_latency_ms']:.2f} | {r['histories_per_s']:,.0f} "
                         f"({r['batch']}) | {'-' if overlap is None else f'{overlap:.3f}'} |")
    return "\n".join(lines)


def epoch_cycle_table(name: str = "epoch_ml1m.json") -> str:
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']}; `{data['command']}` (code {data.get('code_commit', '?')}); medians over "
             f"epochs {data['skip'] + 1}-{data['epochs']}.", "",
             "| variant | processes | epoch cycle s | training s | validation s | trial-epochs/s, all processes |",
             "|---|---|---|---|---|---|"]
    def f(v):
        return "failed" if v is None else f"{v:.2f}"

    for r in data["rows"]:
        lines.append(f"| {r['name']} | {r['copies_run']} | {f(r['cycle_s'])} | {f(r['epoch_s'])} | "
                     f"{f(r['eval_s'])} | {f(r['epochs_per_s_total'])} |")
    return "\n".join(lines)


def pairs_table(*names: str) -> str:
    """Bare and Ray Train rows of one machine, in the order run across `names` (epoch_cycle.py files
    of consecutive calls): each Train row's median training time against the mean of the bare rows
    run just before and after it, so a drift of the machine between rows counts on both sides."""
    rows, heads = [], []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        heads.append(f"`{data['command']}` (code {data.get('code_commit', '?')})")
        rows += [(Path(name).stem, r) for r in data["rows"]]
    clocks = any(r.get("gpu") for _, r in rows)  # epoch_cycle.py samples the GPU since session 21's runs
    lines = [f"Device: {data['device']}; medians over epochs {data['skip'] + 1}-{data['epochs']}; "
             + "; then ".join(heads) + ".", "",
             "| # | file | variant | first epoch s | training s | epochs min-max s | epoch cycle s | "
             "Train / bare around it |"
             + (" SM clock MHz, busy |" if clocks else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if clocks else "")]
    ratios = []
    for i, (file, r) in enumerate(rows):
        copy = r["copies"][0]
        ratio = ""
        if "ray_train" in r["name"]:
            around = [rows[j][1]["epoch_s"] for j in (i - 1, i + 1)
                      if 0 <= j < len(rows) and "ray_train" not in rows[j][1]["name"]]
            if around:
                ratios.append(r["epoch_s"] / (sum(around) / len(around)))
                ratio = f"{ratios[-1]:.3f}"
        clock = f" {r['gpu']['sm_clock_mhz']:.0f} |" if r.get("gpu") else " - |"
        lines.append(f"| {i + 1} | {file} | {r['name']} | {copy['first_epoch_s']:.1f} | {r['epoch_s']:.2f} | "
                     f"{min(copy['epochs_s']):.2f}-{max(copy['epochs_s']):.2f} | {r['cycle_s']:.2f} | {ratio} |"
                     + (clock if clocks else ""))
    lines += ["", f"Train / bare: median {statistics.median(ratios):.3f} over {len(ratios)} Train rows "
              f"(from {min(ratios):.3f} to {max(ratios):.3f})."]
    return "\n".join(lines)


def turns_table(*names: str) -> str:
    """`benchmarks/ray_turns.py` files, one line each: the Ray Train worker's epochs and turns against
    the bare run's around them in time (median, quartiles and count of the ratios). Also reads the
    script's first version (one epoch a turn, whose turn times include the checkpoint's write) and a
    file that kept only the script's closing line (`stdout`: medians and counts)."""
    def cell(ratio) -> str:
        if ratio is None:
            return "-"
        if isinstance(ratio, list):  # the closing line's [median, n]
            return f"{ratio[0]:.3f} (n {ratio[1]})"
        return f"{ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f}, n {ratio['n']})" if ratio["n"] else "-"

    keys = ("training", "training_not_writing", "training_while_writing", "turn", "turn_with_write")
    lines = ["| file | device | CUDA graphs | Train run's own settings | bare run writes checkpoints | epochs a turn | "
             "first epoch s, bare / Train | Train / bare: training | training, no write beside it | "
             "training beside a checkpoint write | turn (train, validate, report) | "
             "turn and its last checkpoint's write |",
             "|---" * 12 + "|"]
    heads = []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        heads.append(f"{Path(name).stem}: `{data['command']}` (code {data.get('code_commit', '?')}; "
                     f"epochs after the first {data['skip']})")
        if "stdout" in data:
            ratios, first = data["stdout"], data["stdout"]["first_epoch_s"]
        elif "train_over_bare" in data:
            ratios, first = data["train_over_bare"], {n: data[n]["first_epoch_s"] for n in ("bare", "train")}
        else:  # the first version: each turn one epoch, its end after the checkpoint's write
            epoch = data["train_over_bare_epoch_s"]
            ratios = {"training": epoch, "training_not_writing": epoch,
                      "turn_with_write": data["train_over_bare_turn_s"]}
            first = {n: data[n]["first_epoch_s"] for n in ("bare", "train")}
        graphs = "yes" if ("reduce-overhead" in data.get("args", data["command"])
                           or "--graphs" in data["command"]) else "no"
        own = ", ".join(f"`{setting}`" for setting in data.get("train_set", [])) or "-"  # ray_turns.py --train-set
        bare_writes = "yes" if data.get("bare_checkpoints") else "no"
        cells = " | ".join(cell(ratios.get(k)) for k in keys)
        lines.append(f"| {Path(name).stem} | {data['device']} | {graphs} | {own} | {bare_writes} | "
                     f"{data.get('epochs_per_turn', 1)} | {first['bare']:.1f} / {first['train']:.1f} | {cells} |")
    return "\n".join(["Each Train epoch (or turn) against the mean of the bare ones just before and after it in "
                      "time; median (quartiles, count) over each file's epochs after its first few. "
                      + "; ".join(heads) + ".", "", *lines])


def compile_start_table(*names: str) -> str:
    """`benchmarks/compile_start.py` result files, one line per process, in the order run."""
    out = []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        trials = any(r.get("trial") for r in data["rows"])  # a column of the trials' overrides where they differ
        lines = [f"Device: {data['device']}; `{data['command']}` (code {data.get('code_commit', '?')}).", "",
                 "| wrapper | process | " + ("trial | " if trials else "") + "cache | to the end of step 2 (s) | "
                 "the two steps (s) | of them loading the compiled module (s) | step, next steps (ms) |",
                 "|---|---|---|---|---|---|---|" + ("---|" if trials else "")]
        for r in data["rows"]:
            load = r.get("phases_s", {}).get("PyCodeCache.load_by_key_path")
            lines.append(f"| {r['wrapper']} | {r['process']} | " + (f"{r['trial']} | " if trials else "")
                         + f"{r['cache']} | {r['start_s']:.1f} | {r['first_steps_s']:.1f} | "
                         f"{'-' if load is None else f'{load:.1f}'} | {r['step_ms']:.2f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def attention_step_table(name: str = "tiled_attention_h200/attention_step_ml1m.json") -> str:
    """benchmarks/attention_step.py: the whole step on each attention kernel."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']}; `{data['command']}` (code {data['code_commit']}); one process per "
             "kernel, one after the other.", "", "| kernel | step ms (median) | samples/s | peak GB |",
             "|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['kernel']} | {r['step_ms']:.2f} | {r['samples_per_s']:,.0f} | "
                     f"{r['peak_mem_mb'] / 1024:.2f} |")
    return "\n".join(lines)


def start_caches_table(*names: str) -> str:
    """`benchmarks/compile_start.py` files whose processes differ in their trials: per process its
    overrides, seconds to the end of step 2 and its hits and misses in the compile caches."""
    files = {name: json.loads((RESULTS / name).read_text()) for name in names}
    lines = [f"- `{data['command']}` (code {data.get('code_commit', '?')}; {data['device']})"
             for data in files.values()]
    lines += ["", "| file | process | trial | cache | to the end of step 2 (s) | FX graphs: hit / missed | "
              "AOTAutograd: hit / missed / bypassed |", "|---|---|---|---|---|---|---|"]
    for name, data in files.items():
        for r in data["rows"]:
            c = r["caches"]
            lines.append(f"| {Path(name).stem} | {r['process']} | {r['trial']} | {r['cache']} | {r['start_s']:.1f} | "
                         f"{c.get('fxgraph_cache_hit', 0)} / {c.get('fxgraph_cache_miss', 0)} | "
                         f"{c.get('autograd_cache_hit', 0)} / {c.get('autograd_cache_miss', 0)} / "
                         f"{c.get('autograd_cache_bypass', 0)} |")
    return "\n".join(lines)


def defaults_table(*names: str) -> str:
    """benchmarks/epoch_cycle.py --suite defaults (files of consecutive calls): each trial's rows
    since session 34 (`_default`: the step graph and fixed shapes where they apply) and before
    (`_before`: plain compile), side by side; a pair whose second row did not finish says so."""
    rows, heads = {}, []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        heads.append(f"call {data.get('device_call', '?')}: `{data['command']}` (code {data.get('code_commit', '?')})")
        rows |= {r["name"]: r for r in data["rows"]}
    lines = [f"Device: {data['device']} (torch {data['torch']}); each row one `tuner train` process, one at a time; "
             f"medians over epochs {data['skip'] + 1}-{data['epochs']}; " + "; ".join(heads) + ".", "",
             "| trial | first epoch s, default / before | training s per epoch, default / before | before / default "
             "| peak MB, default / before |", "|---|---|---|---|---|"]

    def mem(row):
        final = row["copies"][0]["final"]
        return f"{final['peak_mem_mb']:,.0f}" if final.get("peak_mem_mb") else "-"

    for name, new in rows.items():
        if not name.endswith("_default"):
            continue
        trial = name[:-len("_default")]
        old = rows.get(f"{trial}_before")
        first = f"{new['copies'][0]['first_epoch_s']:.1f}"
        if old is None:
            lines.append(f"| {trial} | {first} / not run | {new['epoch_s']:.3f} / not run | | {mem(new)} / - |")
            continue
        lines.append(f"| {trial} | {first} / {old['copies'][0]['first_epoch_s']:.1f} | {new['epoch_s']:.3f} / "
                     f"{old['epoch_s']:.3f} | {old['epoch_s'] / new['epoch_s']:.2f}x | {mem(new)} / {mem(old)} |")
    return "\n".join(lines)


def static_slots_table(name: str = "static_slots.json") -> str:
    """benchmarks/static_slots.py: fixed prediction slots sized from the histories' lengths against
    sized for full-length rows, and what full batches drew."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"{data['device']}; `{data['command']}`; full batches of {data['epochs']} epochs each.", "",
             "| dataset | batch, length | median history shown | slots, full-length rows | slots from the lengths "
             "| predictions a batch, mean / max | batches over the slots | predictions left unmasked |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['dataset']} | {r['batch_size']}, {r['max_len']} | {r['median_visible']:.0f} | "
                     f"{r['slots_full_length']:,} | {r['slots_from_lengths']:,} | {r['predictions_mean']:,.0f} / "
                     f"{r['predictions_max']:,} | {r['batches_over']} of {r['batches']:,} | {r['surplus_share']:.1e} |")
    return "\n".join(lines)


def arms_line(by_arm: dict[str, dict[int, dict]]) -> str:
    """The mean and range of test NDCG@10 of each arm (`paired_table`'s rows by arm and seed)."""
    parts = []
    for arm, rows in by_arm.items():
        values = [r["test_ndcg_10"] for r in rows.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        parts.append(f"{arm} {statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}, "
                     f"{len(values)} seeds, sd {spread:.4f})")
    return "Test NDCG@10, mean (range, seeds, sd): " + "; ".join(parts) + "."


# the ML-1M default against before since the default's last batch is filled (sessions 37 and 38)
FILLED = "h200_session3[78]/defaults_call*.json"


def paired_table(pattern: str, arms: tuple[str, str]) -> str:
    """Two arms of ml1m_variants.py results (variants ARM and ARM_seedK) seed by seed: test NDCG@10
    of each, their difference, and the mean difference over the seeds both arms ran, with its
    standard error and t. `pattern`: a file in benchmarks/results, or a glob of several (one per
    device call); an arm's seed in two of them is an error."""
    runs, by_arm = _arm_rows(pattern, arms)
    first, second = arms
    seeds, diffs, mean, error = _paired(by_arm, arms)
    lines = [_runs_header(runs), "",
             f"| seed | {first} NDCG@10 | {second} NDCG@10 | difference | {first} HR@10 | {second} HR@10 | session |",
             "|---|---|---|---|---|---|---|"]
    for seed, diff in zip(seeds, diffs):
        a, b = by_arm[first][seed], by_arm[second][seed]
        lines.append(f"| {seed} | {a['test_ndcg_10']:.4f} | {b['test_ndcg_10']:.4f} | {diff:+.4f} | "
                     f"{a['test_hr_10']:.4f} | {b['test_hr_10']:.4f} | {a.get('session', '?')} |")
    lower = sum(d < 0 for d in diffs)
    return ("\n".join(lines) + "\n\n" + arms_line(by_arm) + f" {first} minus {second}, paired by seed: "
            f"{mean:+.4f} (standard error {error:.4f}, t = {mean / error:.2f} over {len(diffs)} seeds); "
            f"{first} lower in {lower} of {len(diffs)}.\n\n" + runs_line(by_arm))


def _arm_rows(pattern: str, arms: tuple[str, ...]) -> tuple[list[tuple[Path, dict]], dict[str, dict[int, dict]]]:
    """The results files `pattern` matches (path, parsed JSON), and the finished rows of each of
    `arms` by seed; an arm's seed in two of the files is an error."""
    files = sorted(RESULTS.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no results file matches benchmarks/results/{pattern}")
    runs = [(path, json.loads(path.read_text())) for path in files]
    by_arm: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for _, data in runs:
        for r in data["rows"]:
            arm, _, suffix = r["variant"].partition("_seed")
            if arm in by_arm and r["rc"] == 0:
                seed = int(suffix or 0)
                if seed in by_arm[arm]:
                    raise ValueError(f"{r['variant']} ran twice in benchmarks/results/{pattern}")
                by_arm[arm][seed] = r
    return runs, by_arm


def _paired(by_arm: dict[str, dict[int, dict]], arms: tuple[str, str]) -> tuple[list[int], list[float], float, float]:
    """The seeds both arms ran, test NDCG@10 first minus second at each, their mean and its
    standard error."""
    first, second = arms
    seeds = sorted(set(by_arm[first]) & set(by_arm[second]))
    diffs = [by_arm[first][s]["test_ndcg_10"] - by_arm[second][s]["test_ndcg_10"] for s in seeds]
    return seeds, diffs, statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def gap_change_line(earlier: str, later: str, arms: tuple[str, str]) -> str:
    """`paired_table`'s gap between `arms` in two sets of runs (files or globs as it reads them):
    the later gap with its 95% interval (t with seeds - 1 degrees of freedom), the earlier gap, and
    how far apart the two are against their combined standard error."""
    from scipy import stats

    (_, old, old_mean, old_error), (_, new, new_mean, new_error) = (
        _paired(_arm_rows(pattern, arms)[1], arms) for pattern in (earlier, later))
    half = float(stats.t.ppf(0.975, len(new) - 1)) * new_error
    combined = (old_error ** 2 + new_error ** 2) ** 0.5
    return (f"{arms[0]} minus {arms[1]}: {later} {new_mean:+.4f} (95% interval {new_mean - half:+.4f} to "
            f"{new_mean + half:+.4f}, {len(new)} seeds); {earlier} {old_mean:+.4f} ({len(old)} seeds); the two "
            f"{new_mean - old_mean:+.4f} apart, combined standard error {combined:.4f}.")


def reruns_line(first: str, second: str, arm: str) -> str:
    """One arm run twice at the same seeds (the files `first` and `second` match, as `paired_table`
    reads them): how far test NDCG@10 moves between two runs of one seed. On a GPU a seed does not fix
    a run (atomic adds sum in any order), so this is the noise that pairing by seed leaves."""
    a, b = (_arm_rows(pattern, (arm,))[1][arm] for pattern in (first, second))
    seeds = sorted(set(a) & set(b))
    diffs = [b[s]["test_ndcg_10"] - a[s]["test_ndcg_10"] for s in seeds]
    between = statistics.stdev([a[s]["test_ndcg_10"] for s in seeds])
    spread = statistics.stdev(diffs)
    return (f"{arm} rerun at the same {len(seeds)} seeds ({second} minus {first}): mean {statistics.mean(diffs):+.4f}, "
            f"sd {spread:.4f}, largest {max(diffs, key=abs):+.4f}, so one run's own sd {spread / 2 ** 0.5:.4f}; "
            f"the seeds' own sd in {first} {between:.4f}.")


def _runs_header(runs: list[tuple[Path, dict]]) -> str:
    """"Device: ...; `command`." of one results file (path, its parsed JSON); of several, each
    file's command by its name."""
    devices = sorted({f"{data['device']} (torch {data['torch']})" for _, data in runs})
    if len(runs) == 1:
        return f"Device: {devices[0]}; `{runs[0][1]['command']}`."
    commands = "; ".join(f"{path.relative_to(RESULTS)}: `{data['command']}`" for path, data in runs)
    return f"Device: {', '.join(devices)}; {commands}."


def runs_line(by_arm: dict[str, dict[int, dict]]) -> str:
    """Each arm's median best epoch, mean test HR@10, and range of training wall time."""
    parts = []
    for arm, rows in by_arm.items():
        walls = [r["wall_s"] for r in rows.values()]
        parts.append(f"{arm}: best epoch median {statistics.median(r['best_epoch'] for r in rows.values()):g}, "
                     f"test HR@10 mean {statistics.mean(r['test_hr_10'] for r in rows.values()):.4f}, "
                     f"wall {min(walls):.0f}-{max(walls):.0f} s")
    return "Runs: " + "; ".join(parts) + "."


def kernel_masks_table(folder: str) -> str:
    """The dropout masks of the Triton kernels compiled for a GPU (`tests/*_check.py --cuda` in
    `folder`): each case's kept share at its rate and the largest excess agreement between
    neighbouring rows, columns, heads, batch rows and seeds (0 for independent draws)."""
    device = (RESULTS / folder / "gpu_call1.txt").read_text().splitlines()
    lines = [f"Device: {device[1].split(',')[0]} (torch {device[2]}); `python tests/add_norm_check.py --cuda`, "
             "`python tests/short_attention_check.py --cuda` (every case drops at rate 0.1).", "",
             "| kernel | case | kept share | largest excess agreement (pair) |", "|---|---|---|---|"]
    for kernel in ("add_norm", "short_attention"):
        for case, r in json.loads((RESULTS / folder / f"{kernel}_check_cuda.json").read_text()).items():
            if "excess_agreement" not in r:
                continue
            pair, excess = max(r["excess_agreement"].items(), key=lambda kv: abs(kv[1]))
            lines.append(f"| {kernel} | {case} | {r['kept_fraction']:.4f} | {excess:+.5f} ({pair}) |")
    return "\n".join(lines)


def variants_table(name: str = "seed_options.json") -> str:
    """A `benchmarks/ml1m_variants.py` results file (seed options, losses, refit)."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}); `{data['command']}`; one run per variant.", "",
             "| variant | test NDCG@10 | test HR@10 | best epoch | samples/s | wall s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["rc"] != 0:
            lines.append(f"| {r['variant']} | failed: {r['error'][0]} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['test_ndcg_10']:.4f} | {r['test_hr_10']:.4f} | {r['best_epoch']} | "
                     f"{r['samples_per_s']:,.0f} | {r['wall_s']:.0f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def attention_kernels_table(name: str = "attention_backends.json") -> str:
    """benchmarks/attention_backends.py: GPU time per layer of each attention kernel."""
    data = json.loads((RESULTS / name).read_text())
    code = f" (code {data['code_commit']})" if data.get("code_commit") else ""
    lines = [f"Device: {data['device']} (torch {data['torch']}); sequence {data['length']}, {data['dtype']}, "
             f"a padding mask; `{data['command']}`{code}. Microseconds per layer, CUDA graph replays.", "",
             "| size | attention dropout | kernel | compiled | forward us | forward + backward us | per step ms |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("fwd_bwd_ms") is None:
            continue
        lines.append(f"| {r['size']} | {r['dropout']} | {r['backend']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['fwd_ms'] * 1e3:.0f} | {r['fwd_bwd_ms'] * 1e3:.0f} | {r['per_step_ms']:.2f} |")
    return "\n".join(lines)


def tiled_tiles_table(name: str = "tiled_attention_h200/tiled_attention_tiles.json") -> str:
    """benchmarks/tiled_attention_tiles.py: GPU time of tiled_attention's kernels per launch setting."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}); {data['dtype']}, attention dropout {data['dropout']}, "
             f"a padding mask; `{data['command']}` (code {data['code_commit']}). Microseconds per layer, CUDA graph "
             "replays.", "", "| shape | length | tile | warps | dropout draws | forward us | forward + backward us |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        # session 24's rows: 16- or 32-bit draws at 10 rounds; since then 16-bit, `rounds` per row
        draws = f"16-bit, {r['rounds']} rounds" if "rounds" in r else "16-bit" if r.get("halves") else "32-bit"
        lines.append(f"| {r['size']} | {r['length']} | {r['BLOCK']} | {r['num_warps']} | {draws} | "
                     f"{r['fwd_ms'] * 1e3:.0f} | {r['fwd_bwd_ms'] * 1e3:.0f} |")
    return "\n".join(lines)


def tiled_launch_table(name: str) -> str:
    """benchmarks/tiled_attention_tiles.py since each kernel takes its own tiles: one kernel's
    setting changed per row, then the best of each."""
    data = json.loads((RESULTS / name).read_text())
    lines = [f"Device: {data['device']} (torch {data['torch']}); {data['dtype']}, attention dropout {data['dropout']}, "
             f"{data['rounds']} Philox rounds, a padding mask; `{data['command']}` (code {data['code_commit']}). "
             "Microseconds per layer, CUDA graph replays; a kernel's setting: query positions x key positions, "
             "warps.", "", "| shape | length | row | forward | dQ | dK/dV | forward us | forward + backward us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        cells = " | ".join(f"{m} x {n}, {w}" for m, n, w in (r["forward"], r["dq"], r["dkdv"]))
        times = (f"{r['fwd_ms'] * 1e3:.0f} | {r['fwd_bwd_ms'] * 1e3:.0f}" if "error" not in r
                 else f"error | {r['error']}")
        lines.append(f"| {r['size']} | {r['length']} | {r['kernel']} | {cells} | {times} |")
    return "\n".join(lines)


def attention_dropout_table(folder: str = "attention_dropout_h200") -> str:
    """benchmarks/attention_backends.py --backends triton, one call: session 24's kernels against
    this tree's at 10 and 7 Philox rounds, compiled, microseconds per layer."""
    runs = {"session 24's kernels": "session24", "10 rounds": "rounds10", "7 rounds": "rounds7"}
    lines, rows = [], {}
    for length in (200, 50):
        for label, tag in runs.items():
            data = json.loads((RESULTS / folder / f"attention_backends_{length}_{tag}.json").read_text())
            for r in data["rows"]:
                if r["compiled"]:
                    rows.setdefault((r["size"], length, r["dropout"]), {})[label] = r
        lines.append(f"- length {length}: `{data['command']}` with `--rounds` 10 and 7 (code {data['code_commit']}); "
                     "session 24's kernels: the same script on tree 0965db0")
    head = " | ".join(f"{label}: forward / fwd + bwd us" for label in runs)
    lines = [f"Device: {data['device']} (torch {data['torch']}); bf16, a padding mask, CUDA-graph replays; one call.",
             *lines, "", f"| shape | length | attention dropout | {head} |", "|---|---|---|" + "---|" * len(runs)]
    for (size, length, dropout), by_run in rows.items():
        cells = " | ".join(f"{by_run[label]['fwd_ms'] * 1e3:.0f} / {by_run[label]['fwd_bwd_ms'] * 1e3:.0f}"
                           for label in runs)
        lines.append(f"| {size} | {length} | {dropout} | {cells} |")
    return "\n".join(lines)


def ce_tiles_table(name: str = "ce_kernel_tiles.json") -> str:
    """benchmarks/ce_kernel_tiles.py: GPU time of tuner.ce_kernel's passes per launch setting (session
    14's settings, or session 29's with rows per program, split rows, looping programs and stages)."""
    data = json.loads((RESULTS / name).read_text())
    timing = ("in CUDA graphs (10 calls a replay)" if data.get("timing") == "graph"
              else "each call timed alone by CUDA events")
    lines = [f"Device: {data['device']} (torch {data['torch']}); {data['rows']:,} rows x {data['items']:,} "
             f"bf16 logits; `{data['command']}` (code {data['code_commit']}). Median GPU ms per call, {timing}.", "",
             "| pass | setting | ms | TB/s moved |", "|---|---|---|---|"]
    for r in data["forward"]:
        if "PER_LANE" in r:
            setting = f"block {r['BLOCK']}, sums {'per lane' if r['PER_LANE'] else 'per row'}"
        else:
            setting = f"{r['BLOCK_R']} rows, block {r['BLOCK']}, split {r['SPLIT']}, {r['STAGES']} stages"
        lines.append(f"| forward | {setting}, {r['num_warps']} warps | {r['ms']:.3f} | {r['read_tb_per_s']:.2f} |")
    for r in data["backward"]:
        programs = (f"{r['COLUMN_PROGRAMS']} programs per row block" if r.get("COLUMN_PROGRAMS")
                    else "a program per tile")
        loop = f", {programs}, {r['STAGES']} stage{'s' * (r['STAGES'] != 1)}" if "STAGES" in r else ""
        lines.append(f"| backward | tile {r['BLOCK_N']} x {r['BLOCK_V']}{loop}, {r['num_warps']} warps | "
                     f"{r['ms']:.3f} | {r['read_write_tb_per_s']:.2f} |")
    lines.append(f"| inductor, forward | `_row_ce`'s expression compiled | {data['inductor_forward_ms']:.3f} | |")
    lines.append(f"| inductor, forward + backward | with the bias gradient | "
                 f"{data['inductor_forward_backward_ms']:.3f} | |")
    lines.append(f"| kernels, forward + backward | the best of each | {data['kernel_forward_backward_ms']:.3f} | |")
    return "\n".join(lines)


def gelu_gemm_table(*names: str) -> str:
    """benchmarks/gelu_gemm.py: the feed-forward's GELU in Triton GEMM epilogues against cuBLAS and
    inductor's elementwise kernels, per size: the fastest tile of each pass, and each GEMM alone."""
    lines, rows = [], []
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        lines.append(f"- {data['size']}: `{data['command']}` (code {data['code_commit']}, call {data['device_call']})")
        step, done = data["inductor"], [r for r in data["settings"] if "error" not in r]
        for pass_, gemm in (("forward", "cublas_forward_gemm_ms"), ("backward", "cublas_backward_gemm_ms")):
            fused = data["best"][pass_]  # the script's own pick: the fastest fused tile of this pass
            alone = min(r[f"gemm_{pass_}_ms"] for r in done)
            tile = "x".join(str(fused[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            rows.append(f"| {data['size']} ({data['rows']:,} x {data['hidden']:,} -> {data['ffn']:,}) | {pass_} | "
                        f"{step[gemm]:.3f} | {step[f'{pass_}_ms']:.3f} | {alone:.3f} | {fused[f'{pass_}_ms']:.3f} "
                        f"({tile}, {fused['num_stages']} stages, {fused['num_warps']} warps) | "
                        f"{fused[f'{pass_}_ms'] / step[f'{pass_}_ms']:.2f} |")
    head = (f"Device: {data['device']}; bf16, GPU ms per call in CUDA graphs (10 calls a replay, median of 30); "
            f"{len(data['settings'])} tiles each.")
    columns = ("rows x hidden -> ffn", "pass", "cuBLAS alone", "the step's", "Triton alone",
               "Triton + epilogue, fastest tile", "fused / step's")
    return "\n".join([head, *lines, "", f"| {' | '.join(columns)} |", "|---" * len(columns) + "|", *rows])


def gelu_elementwise_table(*names: str) -> str:
    """benchmarks/gelu_gemm.py --elementwise: inductor's GELU kernels against kernels that move the
    same bytes with less arithmetic, per size."""
    runs = [json.loads((RESULTS / name).read_text()) for name in names]
    lines = [f"Device: {runs[0]['device']} (torch {runs[0]['torch']}); bf16, us per call in CUDA graphs (median of 30 "
             "replays of 10 calls), TB/s moved in brackets."]
    lines += [f"- {r['size']}: `{r['command']}` (code {r['code_commit']}, call {r['device_call']})" for r in runs]
    kernels = [k["kernel"] for k in runs[0]["elementwise"]]
    lines += ["", "| kernel | " + " | ".join(f"{r['size']} ({r['rows']:,} x {r['ffn']:,})" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for i, kernel in enumerate(kernels):
        cells = " | ".join(f"{r['elementwise'][i]['ms'] * 1e3:.1f} ({r['elementwise'][i]['tb_per_s']:.2f})"
                           for r in runs)
        lines.append(f"| {kernel} | {cells} |")
    return "\n".join(lines)


TABLES = {"--attention-200-h200": lambda: attention_kernels_table(
              "tiled_attention_h200/attention_backends_ml1m_200.json"),
          "--attention-512-h200": lambda: attention_kernels_table("tiled_attention_h200/attention_backends_512.json"),
          "--tiled-attention-tiles": tiled_tiles_table,
          "--attention-step-ml1m": attention_step_table,
          "--start-attn-dropout-200-h200": lambda: start_caches_table(
              "tiled_attention_h200/compile_start_attn_dropout_200_triton.json",
              "tiled_attention_h200/compile_start_attn_dropout_200_efficient.json"),
          "--epoch-ml1m-attention": lambda: epoch_cycle_table("tiled_attention_h200/epoch_ml1m_attention.json"),
          "--checkpoint-writer-cpu": lambda: epoch_cycle_table("checkpoint_writer_cpu.json"),
          "--checkpoint-writer-h200": lambda: epoch_cycle_table("checkpoint_writer_cuda.json"),
          "--attention-dropout-h200": attention_dropout_table,
          "--tiled-attention-tiles-rounds": lambda: tiled_tiles_table(
              "attention_dropout_h200/tiled_attention_tiles.json"),
          "--tiled-attention-launch": lambda: tiled_launch_table("attention_dropout_h200/tiled_attention_launch.json"),
          "--gpu-h200-430M-session25": lambda: gpu_table("gpu_throughput_h200/430M_session25.json"),
          "--gpu-h100-session26": lambda: gpu_table("h100_session26/gpu_throughput_430M_130M.json",
                                                    "h100_session26/gpu_throughput_85M_5M.json"),
          "--gpu-h100-430M-runs": lambda: ratio_runs_table(*(f"h100_session26/gpu_throughput_430M_{run}.json"
                                                             for run in ("130M", "run2", "run3"))),
          "--ray-turns-h100": lambda: turns_table("h100_session26/turns130_share05_e16.json",
                                                  "h100_session26/turns130_share05_e40.json"),
          "--seed-options": variants_table, "--losses": lambda: variants_table("ml1m_losses.json"),
          "--losses-gpu": lambda: variants_table("ml1m_losses_gpu.json"),
          "--refit": lambda: variants_table("ml1m_refit.json"), "--model": lambda: variants_table("ml1m_model.json"),
          "--ema": lambda: variants_table("ml1m_ema.json"), "--window": lambda: variants_table("ml1m_window.json"),
          "--gpu-align": lambda: gpu_tables("align_430M", "align_130M", "clip_430M"),
          "--gpu-fused-clip": lambda: gpu_tables("fused_clip_430M", "fused_clip_130M"),
          "--gpu-kernels": lambda: gpu_tables("qkv_attn_430M", "qkv_attn_130M", "table_430M_index_put", "table_430M",
                                           "onehot_430M", "table_130M"),
          "--gpu-weights": lambda: gpu_tables("weights_430M", "weights", "weights_430M_40steps", "weights_430M_ac5fbc7",
                                           "head_sliced_430M", "head_430M_130M", "5a93aa3"),
          "--gpu-latest": lambda: "\n\n".join(gpu_table(f"gpu_throughput_{run}.json") for run in
                                              ("masters_430M", "eb4dafa", "130M_eb4dafa", "small_e504505")),
          "--gpu-stream": lambda: gpu_tables("ce_copies_430M", "residual_mix_430M", "eb4dafa"),
          "--stream": lambda: variants_table("ml1m_stream.json"), "--ce-tiles": ce_tiles_table,
          "--ce-tiles-h200": lambda: ce_tiles_table("h200_session29/ce_kernel_tiles_graphs_b492995.json"),
          "--step-settings-h200": lambda: settings_runs_table("h200_session29"),
          "--gelu-gemm-h200": lambda: gelu_gemm_table("h200_session31/gelu_gemm_430M.json",
                                                      "h200_session31/gelu_gemm_130M.json"),
          "--gelu-elementwise-h200": lambda: gelu_elementwise_table("h200_session31/gelu_elementwise_430M.json",
                                                                    "h200_session31/gelu_elementwise_130M.json"),
          "--process-ab-h200": lambda: process_ab_table("h200_session30/process_ab_1", "h200_session30/process_ab_2"),
          "--process-ab-h200-session32": lambda: process_ab_table("h200_session32/process_ab"),
          "--prune-h200": lambda: prune_table(*(f"h200_session32/gpu_throughput_{run}.json" for run in
                                                ("430M_prune", "430M_prune_2", "130M_prune", "85M_prune",
                                                 "85M_prune_2", "5M_prune", "5M_prune_2", "5M_prune_3"))),
          "--fp16-step-graph-h200": lambda: fp16_step_graph_table(*(f"h200_session38/gpu_throughput_{size}_fp16.json"
                                                                    for size in ("130M", "5M"))),
          "--fp16-weights-h200": lambda: medians_table("h200_session38/gpu_throughput_130M_fp16_fp32_weights.json"),
          # the eb4dafa H100 run at 430M: the residual stream in fp32 (autocast's) against bf16
          "--fp32-residual-h100": lambda: medians_table("gpu_throughput_eb4dafa.json"),
          "--step-graph-h200": lambda: step_graph_table(*(f"h200_session33/gpu_throughput_{size}_step_graph.json"
                                                          for size in ("430M", "130M", "85M", "5M"))),
          "--gpu-attention": lambda: gpu_tables("attn_triton_first_version", "attn_triton_430M"),
          "--gpu-moments": lambda: gpu_tables("moments_430M_first_version", "moments_430M"),
          "--moments": lambda: variants_table("ml1m_moments.json"),
          "--attention-kernels": attention_kernels_table, "--attention": lambda: variants_table("ml1m_attention.json"),
          "--weights": lambda: variants_table("ml1m_weights.json"),
          "--epoch-cycle": epoch_cycle_table, "--ray-overhead": lambda: epoch_cycle_table("ray_overhead.json"),
          "--ray-overhead-threads": lambda: epoch_cycle_table("ray_overhead_threads.json"),
          "--ray-overhead-graphs": lambda: epoch_cycle_table("ray_overhead_graphs.json"),
          "--ray-overhead-direct": lambda: epoch_cycle_table("ray_overhead_direct.json"),
          "--gpu": lambda: gpu_table() + "\n\n" + gpu_table("gpu_throughput_760f968_430M.json"),
          "--gpu-40bbe38": lambda: (gpu_table("gpu_throughput_40bbe38.json") + "\n\n"
                                    + gpu_table("gpu_throughput_small.json")),
          "--gpu-add-norm": lambda: gpu_tables("add_norm_430M", "host_130M") + "\n\n" + add_norm_table(),
          "--gpu-cpp-wrapper": lambda: windows_table("cpp_wrapper_130M_8f4ad8c", "cpp_wrapper_430M_8f4ad8c") + "\n\n"
          + epoch_cycle_table("ray_overhead_cpp_wrapper.json"),
          "--start-h200": lambda: compile_start_table("compile_start_cuda/h200/compile_start_130M.json",
                                                      "compile_start_cuda/h200/compile_start_130M_isa_checks.json"),
          "--start-cpu-attn-dropout": lambda: compile_start_table("compile_start_attn_dropout_cpu.json",
                                                                  "compile_start_attn_dropout_shared_cpu.json"),
          "--start-h200-430M": lambda: compile_start_table("compile_start_cuda/h200/compile_start_430M.json"),
          "--ray-overhead-h200": lambda: epoch_cycle_table("ray_overhead_h200/alone.json") + "\n\n"
          + epoch_cycle_table("ray_overhead_h200/niceness.json"),
          "--start-h200-attn-dropout": lambda: compile_start_table(
              "compile_start_cuda/h200/compile_start_130M_attn_dropout.json",
              "compile_start_cuda/h200/compile_start_130M_attn_dropout_aot_bypass.json"),
          "--ray-overhead-h200-containers": lambda: epoch_cycle_table("ray_overhead_h200/containers.json") + "\n\n"
          + epoch_cycle_table("ray_overhead_h200/pairs.json"),
          "--ray-overhead-h200-pairs": lambda: pairs_table("ray_overhead_h200/pairs16.json",
                                                           "ray_overhead_h200/pairs16b.json"),
          "--ray-turns-h200": lambda: turns_table("ray_turns_h200/turns130_call1.json",
                                                  "ray_turns_h200/turns130_k2_stdout.json",
                                                  "ray_turns_h200/turns130_graphs_k2.json",
                                                  "ray_turns_h200/turns130_share05.json",
                                                  "ray_turns_h200/turns130_graphs_share05.json",
                                                  "ray_turns_h200/turns130_both_ckpt.json",
                                                  "ray_turns_h200/turns130_graphs_both_ckpt.json"),
          "--add-norm": lambda: variants_table("ml1m_add_norm.json"),
          "--ml1m-step-graph": lambda: variants_table("ml1m_step_graph.json"),
          "--static-slots": static_slots_table,
          "--defaults-h200": lambda: defaults_table(*(f"h200_session34/defaults_call{k}.json" for k in (1, 2, 3))),
          "--ml1m-defaults": lambda: paired_table("ml1m_defaults.json", ("default", "before")),
          "--ml1m-defaults-session37": lambda: paired_table("h200_session37/defaults_call*.json",
                                                            ("default", "before")),
          "--kernel-masks-h200": lambda: kernel_masks_table("h200_session37"),
          "--ml1m-reruns": lambda: reruns_line("ml1m_defaults.json", "h200_session37/defaults_call*.json", "before"),
          "--ml1m-gap-change": lambda: gap_change_line("ml1m_defaults.json", "h200_session37/defaults_call*.json",
                                                       ("default", "before")),
          # sessions 37 and 38 together: every seed run with the last batch filled
          "--ml1m-defaults-filled": lambda: paired_table(FILLED, ("default", "before")),
          "--ml1m-reruns-filled": lambda: reruns_line("ml1m_defaults.json", FILLED, "before"),
          "--ml1m-gap-change-filled": lambda: gap_change_line("ml1m_defaults.json", FILLED, ("default", "before")),
          "--defaults-h200-session35": lambda: defaults_table("h200_session35/defaults_call3.json"),
          "--gpu-h200-430M-profiled": lambda: gpu_table("gpu_throughput_h200/430M_profiled.json"),
          "--gpu-h200": lambda: gpu_table(*(f"gpu_throughput_h200/{size}.json"
                                            for size in ("430M", "130M", "85M", "5M"))),
          "--gpu-cpp-wrapper-first": lambda: windows_table("cpp_wrapper_130M", "cpp_wrapper_430M_first",
                                                           "plain_06ca3e7"),
          "--large-catalog": large_catalog_table,
          "--train-step": train_step_table, "--ilora": ilora_table,
          "--multigpu": multigpu_table, "--inference": inference_table}

if __name__ == "__main__":
    import sys

    option = sys.argv[1] if len(sys.argv) > 1 else "--gpu"
    if option in ("-h", "--help"):
        print(f"usage: render_tables.py [TABLE] (default --gpu); tables: {' '.join(TABLES)}")
    elif option not in TABLES:
        sys.exit(f"render_tables.py: no table {option!r}; run with --help for the list")
    else:
        print(TABLES[option]())
