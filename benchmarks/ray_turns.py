r"""Ray Train against the bare loop, epoch by epoch in turns: two live processes, one GPU, no drift between them.

    python benchmarks/ray_turns.py --out OUT/ray_turns.json --epochs 24
    python benchmarks/ray_turns.py --out OUT/ray_turns.json --epochs 4 -- --size tiny --device cpu

Issue 5 asks the 130M configuration through `TorchTrainer` (one worker) to stay within 5% of the
bare loop. Rows run one after the other (`epoch_cycle.py`) drift on a shared machine by more than
that: on an H200, bare rows of one configuration trained an epoch in 1.67 to 2.33 s (session 21).
Here a bare `tuner train` and a `tuner train --workers 1` run at the same time and take turns,
`--epochs-per-turn` epochs each (2 by default): each waits for a token before its turn and hands
it over once its last epoch is trained, validated, checkpointed and reported. So the two runs'
epochs alternate seconds apart on one machine, and each ratio sees the same drift.

A `sitecustomize` hook, installed only for these two runs (Ray's worker processes inherit it),
wraps `tuner.train.loop.train_worker`: the Train worker waits for its first turn before it builds
its model (so it starts after the bare run compiled, and on one fresh inductor cache
(TORCHINDUCTOR_CACHE_DIR) its first epoch says whether it loaded the bare run's compiled step);
after a turn's last report a process passes the token, except after its last epoch, whose turn
runs through the final test. In a real Train run every epoch trains while Ray's upload thread
writes the previous epoch's checkpoint. Within a turn it does here too; at a turn's end the
worker waits for the write before handing over, so that no write runs in the bare run's turn.
So with two epochs a turn, the first of each Train turn trains with no write beside it and the
second with one (`write_during`), and both are set against the bare epochs around them.

Writes `--out`: the command, device, each process's epochs (`epoch_s`, start and end, whether a
write ran beside it) and turns; the Train/bare ratios after `--skip`, each Train epoch or turn
against the mean of the bare ones just before and after it in time: `training` (epoch_s; split
into `training_while_writing` and `training_not_writing`), `turn` (train, validate, report) and
`turn_with_write` (and the wait for the turn's last checkpoint, which a real run overlaps with
training: an upper bound); and whether any two turns overlapped (they must not). The bare run
writes no checkpoints (`tuner train` without `train.checkpoint_dir`) unless `--bare-checkpoints`
(then it writes each in its loop, as one process does, within its turn); `--train-set` gives the Train run
settings of its own (`train.checkpoint_share`, `train.checkpoint_every`). Default `tuner train`
arguments: the 130M row of `epoch_cycle.py`'s `ray_overhead` suite; `--graphs` adds CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from epoch_cycle import GRAPHS, GpuSampler, run_copy, suites
from import_hook import installed, on_import

# imported at every interpreter start of the two runs; wraps train_worker when tuner.train.loop loads
HOOK = r'''
import importlib.abc, importlib.machinery, json, os, sys, time

DIR, NAME, OTHER = os.environ["TURNS_DIR"], os.environ["TURNS_NAME"], os.environ["TURNS_OTHER"]
TOKEN, WAIT_S = os.path.join(DIR, "token"), float(os.environ.get("TURNS_WAIT_S", "1800"))
PER = int(os.environ.get("TURNS_EPOCHS", "1"))  # epochs a turn


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
    """Until the token is ours, the other process ended (its `done` file) or WAIT_S passed."""
    t0 = time.time()
    while _holder() != NAME and not os.path.exists(os.path.join(DIR, f"done.{OTHER}")):
        if time.time() - t0 > WAIT_S:
            print(f"turns: {NAME} waited {WAIT_S:.0f} s for its turn; going on without it", file=sys.stderr)
            return
        time.sleep(0.002)


def _record(**row):
    with open(os.path.join(DIR, f"epochs.{NAME}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


class _Turns:
    """The loop's reporter, passing the token after every PER-th epoch's report. Records each epoch:
    its start and end (its report returned); whether the previous epoch's checkpoint was being
    written (by Ray's upload thread) as it began; at a turn's end, how long it then waited for its
    own checkpoint's write."""

    def __init__(self, inner, last_epoch, start):
        self.inner, self.last_epoch, self.start = inner, last_epoch, start
        self.writing = False

    def log(self, epoch, metrics, checkpoint=None):
        self.inner.log(epoch, metrics, checkpoint)
        end = time.time()
        row = dict(epoch=epoch, start=self.start, end=end, epoch_s=metrics.get("epoch_s"), write_during=self.writing)
        if epoch >= self.last_epoch:  # the final test runs in this turn too
            _record(**row, handed=False)
            return
        if epoch % PER:
            _record(**row, handed=False)
            self.start, self.writing = time.time(), checkpoint is not None
            return
        while checkpoint is not None and not checkpoint.released:  # written before the turn ends
            time.sleep(0.002)
        _record(**row, handed=True, write_wait_s=time.time() - end, write_s=getattr(checkpoint, "write_s", None))
        _give(OTHER)
        _wait()
        self.start, self.writing = time.time(), False

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

''' + on_import('tuner.train.loop')


def read_epochs(path: Path) -> list[dict]:
    """One process's epochs ({epoch, start, end, epoch_s, write_during, handed, and at a turn's end
    write_wait_s and write_s: the wait for its checkpoint's write and the write's own duration}), in order."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def turns_of(epochs: list[dict]) -> list[dict]:
    """The epochs grouped into turns (a turn ends where the token was handed on, or at the last epoch):
    {epoch (the first), start, end, turn_s (to the last report), turn_with_write_s (and the wait for
    the last epoch's checkpoint)}."""
    turns, current = [], []
    for row in epochs:
        current.append(row)
        if row.get("handed") or row is epochs[-1]:
            turn_s = current[-1]["end"] - current[0]["start"]
            turns.append({"epoch": current[0]["epoch"], "epochs": len(current), "start": current[0]["start"],
                          "end": current[-1]["end"], "turn_s": turn_s,
                          "turn_with_write_s": turn_s + current[-1].get("write_wait_s", 0.0)})
            current = []
    return turns


def overlaps(a: list[dict], b: list[dict]) -> int:
    """How many pairs of spans ({start, end}), one from each list, ran at the same time."""
    return sum(x["start"] < y["end"] and y["start"] < x["end"] for x in a for y in b)


def ratios(bare: list[dict], train: list[dict], skip: int, key: str) -> list[dict]:
    """Each Train epoch (or turn) after `skip` by `key` against the mean of the bare ones that ran just
    before and just after it in time (bare epochs up to `skip` left out)."""
    bare = [b for b in bare if b["epoch"] > skip and b.get(key) is not None]
    rows = []
    for t in train:
        if t["epoch"] <= skip or t.get(key) is None:
            continue
        before = max((b for b in bare if b["end"] <= t["start"]), key=lambda b: b["end"], default=None)
        after = min((b for b in bare if b["start"] >= t["end"]), key=lambda b: b["start"], default=None)
        around = [b[key] for b in (before, after) if b is not None]
        if around:
            mean = sum(around) / len(around)
            rows.append({"epoch": t["epoch"], "train": t[key], "bare_around": mean, "ratio": t[key] / mean,
                         **({"write_during": t["write_during"]} if "write_during" in t else {})})
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
    parser.add_argument("--epochs-per-turn", type=int, default=2,
                        help="epochs each process trains before it hands the token on (2: the second of each turn "
                             "trains while the first one's checkpoint is written, as in a real run)")
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs (train.compile_mode=reduce-overhead)")
    parser.add_argument("--bare-checkpoints", action="store_true",
                        help="the bare run writes its checkpoints too (--checkpoint-dir: in its loop, so within "
                             "its turn)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the Ray Train run only (e.g. train.checkpoint_share=0.05)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="-- then `tuner train` arguments (default: epoch_cycle.py's 130M row)")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if {"--workers", "--storage", "--run-name", "--max-epochs"} & set(args):
        sys.exit("ray_turns.py: give the bare run's `tuner train` arguments, without --workers, --storage, "
                 "--run-name or --max-epochs (--epochs sets it)")
    if opts.epochs_per_turn < 1:
        sys.exit(f"ray_turns.py: --epochs-per-turn must be at least 1, not {opts.epochs_per_turn}")
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
              "epochs": opts.epochs, "epochs_per_turn": opts.epochs_per_turn, "skip": opts.skip,
              "bare_checkpoints": opts.bare_checkpoints, "train_set": opts.train_set, "args": " ".join(args)}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        turns = Path(tmp, "turns")
        turns.mkdir()
        base = {"TURNS_DIR": str(turns), "TURNS_EPOCHS": str(opts.epochs_per_turn),
                "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp, "inductor")),
                "PYTHONPATH": installed(Path(tmp, "hook"), HOOK)}
        bare_checkpoints = Path(tmp, "bare_checkpoints")
        plans = {"bare": ([*args, *(["--checkpoint-dir", str(bare_checkpoints)] if opts.bare_checkpoints else [])],
                          {**base, "TURNS_NAME": "bare", "TURNS_OTHER": "train"}),
                 "train": ([*args, *(x for pair in opts.train_set for x in ("--set", pair)), "--workers", "1"],
                           {**base, "TURNS_NAME": "train", "TURNS_OTHER": "bare"})}

        def go(name: str) -> None:
            run_args, env = plans[name]
            try:
                # the Train run's checkpoints in the temporary folder: a run cut short leaves none beside --out
                runs[name] = run_copy(run_args, opts.epochs, out.parent / f"{out.stem}_{name}.log", env,
                                      storage_root=Path(tmp))
            finally:  # a process that ended before its loop did (a failed start) never waits the other out
                (turns / f"done.{name}").touch()

        threads = [threading.Thread(target=go, args=(name,)) for name in plans]
        sampler, t0 = GpuSampler(), time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["wall_s"], result["gpu"] = time.time() - t0, sampler.summary()
        epochs = {name: read_epochs(turns / f"epochs.{name}.jsonl") for name in plans}
        if opts.bare_checkpoints:  # the epoch of the bare run's last checkpoint (its last epoch, if it wrote them)
            from tuner.errors import UserError
            from tuner.train.checkpoint import load_checkpoint

            try:
                result["bare_checkpoint_epoch"] = load_checkpoint(bare_checkpoints)["progress"]["epoch"]
            except UserError:
                result["bare_checkpoint_epoch"] = None
    turns_by = {name: turns_of(rows) for name, rows in epochs.items()}
    for name in plans:
        first = next((r for r in epochs[name] if r["epoch"] == 1), {})
        result[name] = {"rc": runs[name]["rc"], "first_epoch_s": first.get("epoch_s"), "final": runs[name]["final"],
                        "epochs": epochs[name], "turns": turns_by[name]}
    result["overlapping_turns"] = overlaps(turns_by["bare"], turns_by["train"])
    training = ratios(epochs["bare"], epochs["train"], opts.skip, "epoch_s")
    result["train_over_bare"] = {
        "training": {**summary(training), "epochs": training},
        # Train epochs that ran while the previous epoch's checkpoint was written (as every epoch of a
        # real run does), and those that did not (the first of each turn: that write was waited for)
        "training_while_writing": summary([r for r in training if r.get("write_during")]),
        "training_not_writing": summary([r for r in training if not r.get("write_during")]),
        "turn": summary(ratios(turns_by["bare"], turns_by["train"], opts.skip, "turn_s")),
        "turn_with_write": summary(ratios(turns_by["bare"], turns_by["train"], opts.skip, "turn_with_write_s")),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"exit": {n: runs[n]["rc"] for n in runs},
                      "first_epoch_s": {n: result[n]["first_epoch_s"] for n in runs},
                      "overlapping_turns": result["overlapping_turns"],
                      **{k: (v["median"] if v["n"] else None, v["n"]) for k, v in result["train_over_bare"].items()}}))
    if any(runs[n]["rc"] for n in runs):
        sys.exit(f"ray_turns.py: a run failed; its log is beside {out}")


if __name__ == "__main__":
    main()
