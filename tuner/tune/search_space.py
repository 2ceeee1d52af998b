"""Search spaces: YAML files of distributions over dotted config keys -> `ray.tune` objects.

    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.dropout: {uniform: [0.0, 0.5]}
    model.heads: {choice: [2, 4]}

Distributions: `uniform`, `loguniform`, `quniform` ([low, high, q]), `qloguniform`, `randint`
([low, high), integers), `choice` (a list). Every key must be a config key and every sampled
value must pass that key's validation; a mistake is a UserError naming the key.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from tuner.config import all_keys
from tuner.errors import UserError

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "choice")


def default_space_path(size: str) -> Path:
    """`search_spaces/<size>.yaml` of the working directory (a job's --working-dir), else the repo's."""
    local = Path.cwd() / "search_spaces" / f"{size}.yaml"
    return local if local.is_file() else SEARCH_SPACES_DIR / f"{size}.yaml"


def read_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a search-space file; returns `{key: {dist: args}}`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"search space {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"search space {path}: must be a non-empty mapping of config keys to distributions")
    return {str(key): validate_entry(str(key), spec, path) for key, spec in raw.items()}


def validate_entry(key: str, spec: Any, where: Path | str) -> dict[str, Any]:
    keys = all_keys()
    if key not in keys:
        raise UserError(f"search space {where}: unknown config key {key!r}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"search space {where}: {key} must be one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise UserError(f"search space {where}: {key} has unknown distribution {dist!r}; "
                        f"valid: {', '.join(DISTRIBUTIONS)}")
    if dist == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"search space {where}: {key} choice needs a non-empty list")
    else:
        arity = 3 if dist.startswith("q") else 2
        if (not isinstance(args, list) or len(args) != arity
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)):
            raise UserError(f"search space {where}: {key} {dist} needs {arity} numbers")
        low, high = args[0], args[1]
        if not low < high:
            raise UserError(f"search space {where}: {key} {dist} needs low < high, got {low} >= {high}")
        if "log" in dist and low <= 0:
            raise UserError(f"search space {where}: {key} {dist} needs low > 0, got {low}")
    # every value the distribution can produce must be valid for the key: check the ends
    from tuner.config import load_config

    samples = args if dist == "choice" else [args[0], args[1] - (1 if dist == "randint" else 0)]
    for value in samples:
        try:
            load_config(overrides=[f"{key}={value}"])
        except UserError as exc:
            raise UserError(f"search space {where}: {key} {dist} {args} allows an invalid value: {exc}") from None
    return {dist: args}


def to_tune(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`{key: {dist: args}}` -> `{key: ray.tune distribution}` (keys stay dotted and flat)."""
    from ray import tune

    build = {
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
        "qloguniform": lambda a: tune.qloguniform(a[0], a[1], a[2]),
        "randint": lambda a: tune.randint(a[0], a[1]),
        "choice": lambda a: tune.choice(a),
    }
    return {key: build[dist](args) for key, spec in space.items() for dist, args in spec.items()}


def space_hash(space: dict[str, dict[str, Any]]) -> str:
    """A short stable fingerprint, recorded on the MLflow parent run."""
    text = repr(sorted((k, repr(v)) for k, v in space.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
