"""The `tuner` command line: prepare, train, tune, report.

Every user-fixable problem surfaces as `tuner: error: <one line>` with exit code 2; with
`--json` the last line of stdout is one JSON object. Subcommands keep few flags and take the
rest through `--config FILE` and `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Optional, Sequence

from tuner.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise UserError(message)


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", help="model size: tiny, bert4rec, 5M, 85M, 130M, 430M")
    p.add_argument("--data", help="prepared dataset directory or raw interactions file "
                                  "(default: the embedded synthetic dataset)")
    p.add_argument("--synthetic-users", type=int, help="users in the synthetic dataset")
    p.add_argument("--synthetic-items", type=int, help="items in the synthetic dataset")
    p.add_argument("--config", help="YAML file with config sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--ilora", action="store_true", default=None,
                   help="freeze the model and train instance-wise LoRA experts (ilora.* keys)")
    p.add_argument("--init-from", help="start from a checkpoint or MLflow model URI (e.g. models:/bert4rec-130M/1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuner", description="BERT4Rec training and hyperparameter tuning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="raw interactions -> prepared Parquet dataset")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="auto", choices=("auto", "sequences", "movielens", "amazon"))
    p.add_argument("--min-user-interactions", type=int, default=0)
    p.add_argument("--min-item-interactions", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train one model")
    _common_run_flags(p)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--checkpoint-dir", help="write checkpoints here; resume if one exists")
    p.add_argument("--refit", action="store_true", default=None,
                   help="train on the validation targets too for exactly --max-epochs, test the final weights")
    p.add_argument("--workers", type=int, help="DDP workers through Ray Train (default: no Ray)")
    p.add_argument("--run-name", help="Ray Train run name (default: train-<size>); the same name resumes")
    p.add_argument("--storage", default="ray_results", help="Ray Train storage: a path every node sees")

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune, Optuna and ASHA")
    _common_run_flags(p)
    p.add_argument("--search-space", help="YAML of distributions (default: search_spaces/<size>.yaml)")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--search", choices=("optuna", "random"))
    p.add_argument("--scheduler", choices=("asha", "none"))
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="wall-clock budget; trials stop in time to test their best weights")
    p.add_argument("--experiment", help="experiment name (Ray Tune and MLflow); no timestamps")
    p.add_argument("--storage", default="ray_results", help="Ray Tune storage: a path every node sees")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    p.add_argument("--dry-run", action="store_true", help="print the plan without starting Ray")
    p.add_argument("--cluster", help="Ray cluster-launcher YAML: place trials by cluster/placement.yaml")
    p.add_argument("--refit", dest="tune_refit", action="store_true", default=None,
                   help="retrain the winner on the validation targets too for its best epoch count; register that")

    p = sub.add_parser("bench", help="time training steps on random ids")
    p.add_argument("--size", default="tiny")
    p.add_argument("--num-items", type=int, default=10_000)
    p.add_argument("--hidden", type=int)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loss", default="ce")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (fp16 + GradScaler without bf16); default: on for cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--untied-head", action="store_true")
    p.add_argument("--static-shapes", action="store_true", help="fixed batch shapes (for CUDA graphs)")
    p.add_argument("--ilora", action="store_true", help="frozen model + iLoRA experts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides, e.g. --set ilora.router=encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("recommend", help="top-K items for histories from a registered model")
    p.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/bert4rec-tiny/1")
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--history", help='one history of raw item ids, e.g. "12 7 33"')
    group.add_argument("--input", help="Parquet or CSV file with a `history` column")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-history", action="store_true", help="allow items already in the history")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("report", help="an experiment's trials ranked, with Optuna's pictures")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--output", help="where the PNG files go (default: reports/<experiment>)")
    p.add_argument("--json", action="store_true")
    return parser


def run_config(args: argparse.Namespace, defaults: Optional[dict[str, dict[str, Any]]] = None):
    """Config from `defaults`, --config, the named flags, then --set (the most specific wins)."""
    from tuner.config import load_config

    flags: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            flags.setdefault(section, {})[key] = value

    put("model", "size", getattr(args, "size", None))
    put("data", "path", getattr(args, "data", None))
    put("data", "synthetic_users", getattr(args, "synthetic_users", None))
    put("data", "synthetic_items", getattr(args, "synthetic_items", None))
    put("train", "max_epochs", getattr(args, "max_epochs", None))
    put("train", "init_from", getattr(args, "init_from", None))
    put("ilora", "enabled", getattr(args, "ilora", None))
    put("train", "max_steps", getattr(args, "max_steps", None))
    put("train", "batch_size", getattr(args, "batch_size", None))
    put("train", "device", getattr(args, "device", None))
    put("train", "checkpoint_dir", getattr(args, "checkpoint_dir", None))
    put("train", "refit", getattr(args, "refit", None))
    put("tune", "refit", getattr(args, "tune_refit", None))
    put("resources", "workers", getattr(args, "workers", None))
    put("tune", "num_samples", getattr(args, "num_samples", None))
    put("tune", "search", getattr(args, "search", None))
    put("tune", "scheduler", getattr(args, "scheduler", None))
    put("tune", "time_budget_s", getattr(args, "time_budget", None))
    put("tracking", "experiment", getattr(args, "experiment", None))
    put("tracking", "tracking_uri", getattr(args, "tracking_uri", None))
    cfg_file = load_config(args.config).to_dict() if args.config else (defaults or {})
    merged = {s: {**cfg_file.get(s, {}), **flags.get(s, {})} for s in set(cfg_file) | set(flags)}
    if "model" in flags and "size" in flags["model"] and "model" in merged:
        # a new size re-derives its architecture unless the user set fields explicitly by --set
        for key in ("hidden", "layers", "heads", "ffn", "max_len"):
            if key not in flags["model"]:
                merged["model"][key] = None
    return load_config(None, args.set, base=merged)


def cmd_prepare(args: argparse.Namespace) -> dict:
    from tuner.data.prepare import prepare

    result = prepare(args.input, args.output, args.format, args.min_user_interactions,
                     args.min_item_interactions)
    meta = result["meta"]
    print(f"prepared {meta['num_users']} users, {meta['num_items']} items, "
          f"{meta['num_interactions']} interactions -> {args.output}", file=sys.stderr)
    return meta


def cmd_train(args: argparse.Namespace) -> dict:
    cfg = run_config(args)
    if args.workers:
        from tuner.train.driver import fit

        return fit(cfg, quiet=args.json, storage=args.storage, name=args.run_name)
    from tuner.train.loop import train_worker
    from tuner.train.parallel import local_context
    from tuner.train.reporting import ConsoleReporter

    return train_worker(cfg, local_context(cfg.train), ConsoleReporter())


# The embedded default's per-trial budget (without --config): 12 epochs of batch 64 let the tiny
# model learn the synthetic data's transitions while 8 trials finish in about 3 minutes on 2 cores.
TUNE_DEFAULTS = {"train": {"max_epochs": 12, "batch_size": 64}}


def cmd_tune(args: argparse.Namespace) -> dict:
    from tuner.tune.experiment import check_tunable, describe, local_resources, make_plan, plan_dict, run_experiment
    from tuner.tune.search_space import default_space_path, read_space

    cfg = run_config(args, TUNE_DEFAULTS)
    if args.experiment is None and cfg.tracking.experiment == "bert4rec":
        cfg.tracking.experiment = f"bert4rec-{cfg.model.size}"
    space = read_space(args.search_space or default_space_path("ilora" if cfg.ilora.enabled else cfg.model.size))
    check_tunable(cfg, space)
    if args.cluster:
        from tuner.config import Config
        from tuner.tune.placement import apply_placement, plan_json, plan_placements

        placements = plan_placements(cfg.model.size, args.cluster)
        if args.dry_run:
            if not args.json:
                for p in placements:
                    print(f"{p.accelerator_type:>5} ({p.node_type}): {p.workers} worker(s) x "
                          f"{p.gpus_per_trial / p.workers:g} GPU, {p.precision}, batch {p.batch_size}, "
                          f"up to {p.max_concurrent} trials at once" + ("  <- runs here" if p.selected else ""))
            return plan_json(placements)
        cfg = Config.from_dict(apply_placement(cfg.to_dict(), placements[0]))
    if args.dry_run:
        from pathlib import Path

        dataset = cfg.data.path or f"synthetic-{cfg.data.synthetic_users}x{cfg.data.synthetic_items}"
        plan = make_plan(cfg, space, str(Path(args.storage).resolve()), local_resources(), dataset)
        if not args.json:
            print(describe(plan), end="")
        return plan_dict(plan)
    summary = run_experiment(cfg, space, args.storage, args.resume, quiet=args.json)
    if not args.json:
        _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"\nexperiment {summary['experiment']}: {summary['num_trials']} trials "
          f"({summary['trials_completed']} completed, {summary['trials_stopped_early']} stopped early by ASHA, "
          f"{summary['trials_error']} failed)")
    print(f"best trial {summary['best_trial_id']}: val_ndcg_10 {summary['best_val_ndcg_10']:.4f}"
          + (f", test_ndcg_10 {summary['test_ndcg_10']:.4f}, test_hr_10 {summary['test_hr_10']:.4f}"
             if "test_ndcg_10" in summary else ""))
    for key, value in sorted(summary["best_config"].items()):
        print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
    if summary.get("registered_model"):
        print(f"registered model: {summary['registered_model']} ({summary['model_uri']})")
    print(f"compare the trials: {summary['mlflow_ui']}")


def cmd_report(args: argparse.Namespace) -> dict:
    from tuner.report import format_table, report
    from tuner.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    result = report(uri, args.experiment, args.output)
    if not args.json:
        keys = sorted({k for t in result["trials"] for k in t["params"]}
                      & {"optim.lr", "model.dropout", "optim.weight_decay"})
        print(format_table(result, keys))
        for picture in result["pictures"]:
            print(f"wrote {picture}")
    return result


def cmd_bench(args: argparse.Namespace) -> dict:
    from tuner.bench import BenchSpec, run_bench
    from tuner.losses import LOSSES

    if args.loss not in LOSSES:
        raise UserError(f"unknown loss {args.loss!r}; valid: {', '.join(LOSSES)}")
    for name in ("num_items", "batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    spec = BenchSpec(size=args.size, num_items=args.num_items, hidden=args.hidden, batch_size=args.batch_size,
                     seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, loss=args.loss,
                     amp=args.amp if args.amp is not None else args.device == "cuda",
                     compile=args.compile, compile_mode=args.compile_mode, device=args.device, seed=args.seed,
                     tied_head=not args.untied_head, static_shapes=args.static_shapes, ilora=args.ilora,
                     overrides=tuple(args.set))
    result = run_bench(spec)
    if not args.json:
        print(f"{result['size']} V={result['num_items']} B={result['batch_size']} L={result['seq_len']} "
              f"{result['amp']} compile={result['compile']}: {result['step_ms']:.2f} ms/step "
              f"(host {result['host_ms']:.2f} ms to issue it), "
              f"{result['samples_per_s']:.0f} samples/s, peak {result['peak_mem_mb']:.0f} MB")
    return result


def cmd_recommend(args: argparse.Namespace) -> dict:
    import pandas as pd

    from tuner.tracking import _quiet_http, resolve_tracking_uri

    if args.k < 1:
        raise UserError("--k must be at least 1")
    uri = resolve_tracking_uri(args.tracking_uri)
    if args.history is not None:
        frame = pd.DataFrame({"history": [args.history]})
    else:
        path = args.input
        try:
            frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype=str)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot be read ({str(exc).splitlines()[0][:160]})") from None
        if "history" not in frame.columns:
            raise UserError(f"{path}: needs a `history` column")
    import mlflow
    import mlflow.pyfunc

    _quiet_http()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise UserError(f"model {args.model}: cannot be loaded ({str(exc).splitlines()[0][:200]})") from None
    out = model.predict(frame, params={"k": args.k, "exclude_history": not args.include_history})
    rows = [{"history": str(h), "items": list(i), "scores": list(sc), "unknown": list(u)}
            for h, i, sc, u in zip(frame["history"], out["items"], out["scores"], out["unknown"])]
    if not args.json:
        for row in rows:
            if row["unknown"]:
                print(f"unknown item ids ignored: {' '.join(row['unknown'])}", file=sys.stderr)
            print(" ".join(row["items"]))
    return {"model": args.model, "k": args.k, "recommendations": rows}


COMMANDS = {"bench": cmd_bench, "recommend": cmd_recommend, "prepare": cmd_prepare, "train": cmd_train,
            "tune": cmd_tune, "report": cmd_report}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        result = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"tuner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuner: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(_jsonable(result), sort_keys=True))
    return 0
