r"""Ray Train against the bare loop, epoch by epoch in turns: two live processes, one GPU, no drift between them.

    python benchmarks/ray_turns.py --out OUT/ray_turns.json --epochs 24
    python benchmarks/ray_turns.py --out OUT/ray_turns.json --epochs 4 -- --size tiny --device cpu

Issue 5 asks the 130M configuration through `TorchTrainer` (one worker) to stay within 5% of the
bare loop. Rows run one after the other (`epoch_cycle.py`) drift on a shared machine by more than
that: on an H200, bare rows of one configuration trained an epoch in 1.67 to 2.33 s (session 21).
Here a bare `tuner train` and a `tuner train --workers 1` run at the same time and take turns,
one epoch each: each waits for a token before its epoch and hands it over once the epoch is
trained, validated, checkpointed and reported. So epoch e of one and epoch e of the other run
seconds apart on the same machine, and each epoch's ratio sees the same drift.

A `sitecustomize` hook, installed only for these two runs (Ray's worker processes inherit it),
wraps `tuner.train.loop.train_worker`: the Train worker waits for its first turn before it builds
its model (so it starts after the bare run compiled, and on one fresh inductor cache
(TORCHINDUCTOR_CACHE_DIR) its first epoch says whether it loaded the bare run's compiled step);
after every epoch's report a process passes the token, except after its last, which keeps it
through the final test. A Train epoch's turn also waits for its checkpoint's write, which in a
real run overlaps the next epoch: turn times count it in full, so the Train/bare ratio of turn
times is an upper bound; the ratio of training times (`epoch_s`) counts no write at all.

Writes `--out`: the command, device, each process's epochs (`epoch_s` and the turn's start and
end), the Train/bare ratio of each epoch after `--skip` (training, and the whole turn) against the
mean of the bare epochs just before and after it, their medians, and whether any two turns
overlapped (they must not). Default `tuner train` arguments: the 130M row of `epoch_cycle.py`'s
`ray_overhead` suite; `--graphs` adds CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from epoch_cycle import GRAPHS, GpuSampler, run_copy, suites

ROOT = Path(__file__).resolve().parents[1]

# imported at every interpreter start of the two runs; wraps train_worker when tuner.train.loop loads
HOOK = r'''
import importlib.abc, importlib.machinery, json, os, sys, time

DIR, NAME, OTHER = os.environ["TURNS_DIR"], os.environ["TURNS_NAME"], os.environ["TURNS_OTHER"]
TOKEN, WAIT_S = os.path.join(DIR, "token"), float(os.environ.get("TURNS_WAIT_S", "1800"))


def _holder():
    try:
        with open(TOKEN) as f:
            return f.read()
    except OSError:
        return ""


def _give(to):
    tmp = os.path.join(DIR, f"token.{NAME}")
    with open(tmp, "w") as f:
        f.write(to)
    os.replace(tmp, TOKEN)


def _wait():
    """Until the token is ours or the other process ended (its `done` file); True if we waited it out."""
    t0 = time.time()
    while _holder() != NAME and not os.path.exists(os.path.join(DIR, f"done.{OTHER}")):
        if time.time() - t0 > WAIT_S:
            print(f"turns: {NAME} waited {WAIT_S:.0f} s for its turn; going on without it", file=sys.stderr)
            return False
        time.sleep(0.002)
    return True


def _record(**row):
    with open(os.path.join(DIR, f"turns.{NAME}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


class _Turns:
    """The loop's reporter, passing the token after each epoch's report."""

    def __init__(self, inner, last_epoch, start):
        self.inner, self.last_epoch, self.start = inner, last_epoch, start

    def log(self, epoch, metrics, checkpoint=None):
        self.inner.log(epoch, metrics, checkpoint)
        while checkpoint is not None and checkpoint._release is not None:  # Ray's upload thread writes it
            time.sleep(0.002)
        end = time.time()
        _record(epoch=epoch, start=self.start, end=end, epoch_s=metrics.get("epoch_s"))
        if epoch >= self.last_epoch:  # the final test runs in this turn too
            return
        _give(OTHER)
        _wait()
        self.start = time.time()

    def final(self, metrics):
        self.inner.final(metrics)


def _patch(loop):
    train_worker = loop.train_worker

    def in_turns(cfg, ctx, reporter, *args, **kwargs):
        if NAME == "train":
            _wait()
        try:
            return train_worker(cfg, ctx, _Turns(reporter, cfg.train.max_epochs, time.time()), *args, **kwargs)
        finally:
            open(os.path.join(DIR, f"done.{NAME}"), "w").close()
            _give(OTHER)

    loop.train_worker = in_turns


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tuner.train.loop":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def read_turns(path: Path) -> list[dict]:
    """One process's turns ({epoch, start, end, epoch_s}), in order."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def overlaps(a: list[dict], b: list[dict]) -> int:
    """How many pairs of turns, one from each list, ran at the same time."""
    return sum(x["start"] < y["end"] and y["start"] < x["end"] for x in a for y in b)


def ratios(bare: list[dict], train: list[dict], skip: int, key: str) -> list[dict]:
    """Each Train epoch after `skip` against the mean of the bare epochs just before and after it in
    time (bare epoch e runs before Train epoch e, bare epoch e + 1 after it), by `key` (`epoch_s`
    or `turn_s`)."""
    by_epoch = {t["epoch"]: t for t in bare}
    rows = []
    for t in train:
        around = [by_epoch[e][key] for e in (t["epoch"], t["epoch"] + 1) if e in by_epoch]
        if t["epoch"] > skip and around and t.get(key):
            rows.append({"epoch": t["epoch"], "train": t[key], "bare_around": sum(around) / len(around),
                         "ratio": t[key] / (sum(around) / len(around))})
    return rows


def summary(rows: list[dict]) -> dict:
    values = sorted(r["ratio"] for r in rows)
    if not values:
        return {"n": 0}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"n": len(values), "median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "min": values[0], "max": values[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the result file (JSON); the runs' logs go beside it")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--skip", type=int, default=3, help="leading epochs left out (compile, warm-up)")
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs (train.compile_mode=reduce-overhead)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="-- then `tuner train` arguments (default: epoch_cycle.py's 130M row)")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if {"--workers", "--storage", "--run-name", "--max-epochs"} & set(args):
        sys.exit("ray_turns.py: give the bare run's `tuner train` arguments, without --workers, --storage, "
                 "--run-name or --max-epochs (--epochs sets it)")
    if opts.epochs <= opts.skip:
        sys.exit(f"ray_turns.py: --epochs {opts.epochs} leaves nothing after --skip {opts.skip}")
    if not args:
        args = next(v["args"] for v in suites("")["ray_overhead"] if v["name"] == "130M_bare")
    args = [*args, "--set", "train.patience=0", *(GRAPHS if opts.graphs else [])]
    import torch

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "command": "python benchmarks/ray_turns.py " + " ".join(sys.argv[1:]),
              "epochs": opts.epochs, "skip": opts.skip, "args": " ".join(args)}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        turns, hook = Path(tmp, "turns"), Path(tmp, "hook")
        turns.mkdir()
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        base = {"TURNS_DIR": str(turns), "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp, "inductor")),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")]))}
        plans = {"bare": (args, {**base, "TURNS_NAME": "bare", "TURNS_OTHER": "train"}),
                 "train": ([*args, "--workers", "1"], {**base, "TURNS_NAME": "train", "TURNS_OTHER": "bare"})}

        def go(name: str) -> None:
            run_args, env = plans[name]
            try:
                runs[name] = run_copy(run_args, opts.epochs, out.parent / f"{out.stem}_{name}.log", env)
            finally:  # a process that ended before its loop did (a failed start) never waits the other out
                (turns / f"done.{name}").touch()

        threads = [threading.Thread(target=go, args=(name,)) for name in plans]
        sampler, t0 = GpuSampler(), time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["wall_s"], result["gpu"] = time.time() - t0, sampler.summary()
        per = {name: read_turns(turns / f"turns.{name}.jsonl") for name in plans}
    for name, rows in per.items():
        for row in rows:
            row["turn_s"] = row["end"] - row["start"]
        first = next((r for r in rows if r["epoch"] == 1), {})
        result[name] = {"rc": runs[name]["rc"], "first_epoch_s": first.get("epoch_s"), "final": runs[name]["final"],
                        "turns": rows}
    result["overlapping_turns"] = overlaps(per["bare"], per["train"])
    for key in ("epoch_s", "turn_s"):
        rows = ratios(per["bare"], per["train"], opts.skip, key)
        result[f"train_over_bare_{key}"] = {**summary(rows), "epochs": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    training, turn = result["train_over_bare_epoch_s"], result["train_over_bare_turn_s"]
    print(json.dumps({"exit": {n: runs[n]["rc"] for n in runs}, "first_epoch_s": {n: result[n]["first_epoch_s"] for n in runs},
                      "overlapping_turns": result["overlapping_turns"], "training_ratio": training.get("median"),
                      "turn_ratio": turn.get("median"), "n": training["n"]}))
    if any(runs[n]["rc"] for n in runs):
        sys.exit(f"ray_turns.py: a run failed; its log is beside {out}")


if __name__ == "__main__":
    main()
