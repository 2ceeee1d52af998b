r"""Why a Ray Train worker misses the compiled step that a bare process cached: the two cache keys, field by field.

    python benchmarks/cache_keys.py --out OUT/cache_keys -- --size tiny --device cuda --max-epochs 1

Runs `tuner train ARGS` twice on one fresh inductor cache (TORCHINDUCTOR_CACHE_DIR): first bare, then
through Ray Train (`--workers 1`). Both run with torch's cache-key logs on (TORCH_LOGS for
`torch._inductor.codecache` and AOTAutograd's cache), which print every FX graph and AOTAutograd
cache key with the hash of each part of it. A `sitecustomize` hook, installed only for these two
runs, adds the pickled bytes behind each part (parts up to `--max-bytes`), so a part whose printed
text is the same in both runs but whose hash is not can be read byte by byte.

Writes `OUT/bare.log` and `OUT/train.log` (the key lines only) and `OUT/cache_keys.json`: for each
key the two runs computed, in order, its kind (`aot` or `fx`), the compile frame, whether the
worker hit the cache, and the parts whose hashes differ; for the first `--explain` of those, the
two texts and the lines of `pickletools`' disassembly that differ. The hook replaces any other
`sitecustomize` module for these two runs.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import io
import json
import os
import pickletools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from import_hook import installed, on_import

ROOT = Path(__file__).resolve().parents[1]

LOGS = "+torch._inductor.codecache,+torch._functorch._aot_autograd.autograd_cache"

# imported at every interpreter start of the two runs (Ray's worker processes too); patches inductor's
# cache pickler when torch imports it, so processes that never import torch pay nothing
HOOK = r'''
import importlib.abc, importlib.machinery, os, sys

MAX = int(os.environ.get("CACHE_KEYS_MAX_BYTES", "4096"))


def _patch(codecache):
    debug_lines = codecache.FxGraphCachePickler.debug_lines

    def with_bytes(self, inp):
        lines = debug_lines(self, inp)
        for attr, obj in vars(inp).items():
            items = (enumerate(obj) if isinstance(obj, list) else obj.items() if isinstance(obj, dict)
                     else [(None, obj)])
            for index, value in items:
                name = attr if index is None else f"{attr}[{index}]"
                try:
                    data = self.dumps(value)
                except Exception:
                    lines.append(f"PICKLE {name} error")
                    continue
                lines.append(f"PICKLE {name} {data.hex() if len(data) <= MAX else 'long'}")
        return lines

    codecache.FxGraphCachePickler.debug_lines = with_bytes

''' + on_import('torch._inductor.codecache')

# one log line: "<level+time> <pid> <file>:<line>] [0/1] <message>", a Ray worker's with a "(RayTrainWorker ...)" prefix
FRAME = re.compile(r"\] \[(\d+/\d+)\] (.*)$")
HEADER = re.compile(r"(Autograd|FX) graph cache hash details for key (\w+):")
PART = re.compile(r"^\[(\w{40,64})\] ([^:]+): ?(.*)$")
PICKLED = re.compile(r"^PICKLE (\S+) (\S+)$")
RESULT = re.compile(r"(AOTAutograd|fx graph) cache (hit|miss|bypass)\w* for key (\w+)", re.I)
SYMBOL = re.compile(r"\bs\d+\b")  # a symbolic size in a TensorMetadata's text: shape=torch.Size([s65, 32])
KEPT = ("hash details", "PICKLE", "] [", "cache hit", "cache miss", "cache bypass")


def run(label: str, args: list[str], out: Path, env: dict, tmp: str) -> int:
    """`tuner train ARGS` with the key logs on; keeps only the key lines in OUT/<label>.log. The logs
    go to a file (TORCH_LOGS_OUT, appended to by every process): Ray forwards a worker's output to
    the driver asynchronously, and lines still in flight when the driver exits are lost."""
    raw, console = Path(tmp, f"{label}.torch.log"), Path(tmp, f"{label}.out")
    with open(console, "w") as sink:
        code = subprocess.run([sys.executable, "-m", "tuner", "train", *args], cwd=ROOT, stdout=sink,
                              stderr=subprocess.STDOUT, env={**env, "TORCH_LOGS_OUT": str(raw)}).returncode
    if code:
        print(f"{label}: exit {code}; its output ends:\n"
              + "".join(console.read_text(errors="replace").splitlines(True)[-15:]))
    with open(out / f"{label}.log", "w") as log:
        for line in (raw.open(errors="replace") if raw.exists() else []):
            if any(k in line for k in KEPT):
                log.write(line)
    return code


def parse(path: Path) -> tuple[list[dict], dict[str, str]]:
    """The keys in the order computed ({kind, frame, key, parts: {name: {hash, text, pickle}}}) and each
    key's result (hit, miss or bypass)."""
    keys, results, current = [], {}, None
    text = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for line in text.decode(errors="replace").splitlines():
        if m := RESULT.search(line):
            results.setdefault(m.group(3), m.group(2).lower())
        m = FRAME.search(line)
        if not m:
            continue
        frame, message = m.groups()
        if h := HEADER.search(message):
            current = {"kind": "aot" if h.group(1) == "Autograd" else "fx", "frame": frame, "key": h.group(2),
                       "parts": {}}
            keys.append(current)
        elif current is not None and (p := PART.match(message)):
            current["parts"].setdefault(p.group(2), {"hash": p.group(1), "text": p.group(3)})
        elif current is not None and (p := PICKLED.match(message)):
            current["parts"].setdefault(p.group(1), {})["pickle"] = p.group(2)
    return keys, results


def disassembly(hexdata: str | None) -> list[str]:
    """pickletools' listing of a logged pickle, without the byte offsets (they shift between runs)."""
    if not hexdata or hexdata in ("long", "error"):
        return [hexdata or "no bytes"]
    text = io.StringIO()
    pickletools.dis(bytes.fromhex(hexdata), out=text, annotate=0)
    return [re.sub(r"^\s*\d+:\s*", "", line) for line in text.getvalue().splitlines()]


def places(keys: list[dict]) -> dict[tuple, dict]:
    """(kind, frame, n) -> the n-th key of that kind computed in that compile frame, in order."""
    count: dict[tuple, int] = {}
    placed = {}
    for key in keys:
        kind_frame = (key["kind"], key["frame"])
        placed[(*kind_frame, count.get(kind_frame, 0))] = key
        count[kind_frame] = count.get(kind_frame, 0) + 1
    return placed


def compare(bare: list[dict], train: list[dict], results: dict[str, str], explain: int) -> list[dict]:
    """Each of the worker's keys against the bare run's key of the same kind, frame and order (a hit
    in AOTAutograd's cache skips the FX keys, so the lists need not line up)."""
    bare_keys = places(bare)
    rows = []
    for place, b in places(train).items():
        a = bare_keys.get(place)
        row = {"kind": b["kind"], "frame": b["frame"], "worker_result": results.get(b["key"])}
        if a is None:
            rows.append({**row, "bare_key": None})
            continue
        differ = [name for name in b["parts"] if b["parts"][name].get("hash") != a["parts"].get(name, {}).get("hash")]
        row.update(same_key=a["key"] == b["key"], parts=len(b["parts"]), differing=differ,
                   differing_with_the_same_text=sum(a["parts"].get(n, {}).get("text") == b["parts"][n].get("text")
                                                    for n in differ),
                   example_inputs=inputs_by_shape(b["parts"], set(differ)))
        row["explained"] = [{
            "part": name,
            "same_text": a["parts"].get(name, {}).get("text") == b["parts"][name].get("text"),
            "bare_text": a["parts"].get(name, {}).get("text", "")[:300],
            "worker_text": b["parts"][name].get("text", "")[:300],
            "pickle_diff": [line for line in difflib.unified_diff(
                disassembly(a["parts"].get(name, {}).get("pickle")), disassembly(b["parts"][name].get("pickle")),
                "bare", "worker", n=1, lineterm="")][:40],
        } for name in differ[:explain]]
        rows.append(row)
    return rows


def inputs_by_shape(parts: dict, differ: set) -> dict[str, int]:
    """The example inputs whose shape and strides are all numbers (`static`: parameters, buffers, a
    first graph's batch) and the rest (`symbolic`: a dynamic dimension, or a size itself), each with
    how many of them differ and how many carry a memory format (torch gives none where a dimension
    is symbolic)."""
    names = [n for n in parts if n.startswith("example_inputs")]
    static = {n for n in names if parts[n].get("text", "").startswith("TensorMetadata(")
              and not SYMBOL.search(parts[n]["text"].split("device=")[0])}
    formatted = {n for n in names if "memory_format=torch." in parts[n].get("text", "")}
    return {"static": len(static), "static_differ": len(static & differ),
            "static_with_a_memory_format": len(static & formatted),
            "symbolic": len(names) - len(static), "symbolic_differ": len(differ & (set(names) - static)),
            "symbolic_with_a_memory_format": len(formatted - static)}


def tally(results: dict[str, str]) -> dict[str, int]:
    """How many keys hit, missed or bypassed the cache."""
    return {outcome: sum(r == outcome for r in results.values()) for outcome in ("hit", "miss", "bypass")}


def log_file(folder: Path, label: str) -> Path | None:
    """folder's <label>.log, or <label>.log.gz (committed logs are compressed)."""
    return next((p for p in (folder / f"{label}.log", folder / f"{label}.log.gz") if p.is_file()), None)


def report(folder: Path, explain: int, command: str, extra: dict) -> dict:
    """The comparison of folder's bare.log and train.log, and every log's hits and misses (each log
    parsed once: the GPU's run to MBs)."""
    logs: dict[str, Path] = {}
    for log in sorted([*folder.glob("*.log"), *folder.glob("*.log.gz")]):
        logs.setdefault(log.name.split(".")[0], log)  # <label>.log sorts before <label>.log.gz, as log_file prefers
    parsed = {label: parse(log) for label, log in logs.items()}
    (bare, _), (train, results) = parsed["bare"], parsed["train"]
    rows = compare(bare, train, results, explain)
    return {
        "command": command,
        **extra,
        "runs": {label: {"keys": len(keys), **tally(res)} for label, (keys, res) in parsed.items()},
        "keys_that_differ": sum(bool(r.get("differing")) for r in rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the logs and cache_keys.json")
    parser.add_argument("--from-logs", nargs=2, metavar=("DEVICE", "TORCH"),
                        help="run nothing: compare the bare.log and train.log (or .gz) already in --out, "
                             "written on DEVICE under torch version TORCH")
    parser.add_argument("--max-bytes", type=int, default=4096, help="largest part whose pickle is logged")
    parser.add_argument("--explain", type=int, default=3, help="differing parts explained per key")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then `tuner train` arguments")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    out = Path(opts.out)
    if opts.from_logs:
        if not (log_file(out, "bare") and log_file(out, "train")):
            sys.exit(f"cache_keys.py: {out} holds no bare.log and train.log (or .log.gz) to compare")
        extra = dict(zip(("device", "torch"), opts.from_logs))
    else:
        import torch

        extra = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
        if not args or {"--workers", "--storage", "--run-name"} & set(args):
            sys.exit("cache_keys.py: give the bare run's `tuner train` arguments after --, "
                     "without --workers, --storage or --run-name")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp, "inductor")
            env = {**os.environ, "TORCH_LOGS": LOGS, "TORCHINDUCTOR_CACHE_DIR": str(cache),
                   "CACHE_KEYS_MAX_BYTES": str(opts.max_bytes),
                   "PYTHONPATH": installed(Path(tmp, "hook"), HOOK)}
            # a fresh Ray Train storage: an existing run of the same name would resume, not compile
            worker = [*args, "--workers", "1", "--storage", str(Path(tmp, "ray")), "--run-name", "cache-keys"]
            extra["exit_codes"] = {"bare": run("bare", args, out, env, tmp),
                                   "train": run("train", worker, out, env, tmp)}
    result = report(out, opts.explain, "python benchmarks/cache_keys.py " + " ".join(sys.argv[1:]), extra)
    (out / "cache_keys.json").write_text(json.dumps(result, indent=1) + "\n")
    train = result["runs"]["train"]
    print(f"worker: {train['hit']} cache hits, {train['miss']} misses; {result['keys_that_differ']} of its "
          f"{len(result['rows'])} keys differ from the bare run's -> {out / 'cache_keys.json'}")


if __name__ == "__main__":
    main()
