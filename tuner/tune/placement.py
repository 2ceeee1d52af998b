"""Placement: where a model size's trials run on a heterogeneous GPU cluster, and how.

The policy is `cluster/placement.yaml` (GPU types with memory and bf16 support; per size the
GPU types allowed, GPUs per worker, DDP workers, batch size, measured peak memory). A cluster is
a Ray cluster-launcher YAML (`available_node_types` with `resources` and `max_workers`). For
each allowed GPU type the cluster has, `plan_placements` gives the trial layout, precision
(bf16, or fp16 + GradScaler without bf16), a batch size that fits the GPU (or the trial's share
of it), and how many trials fit at once. Trials are pinned to their GPU type through Ray's
`accelerator_type:<T>` resource (`ScalingConfig(accelerator_type=...)`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from tuner.errors import UserError

POLICY_FILE = Path(__file__).resolve().parents[2] / "cluster" / "placement.yaml"
MEMORY_HEADROOM = 0.8  # use at most this share of a GPU's memory


@dataclass
class Placement:
    accelerator_type: str
    node_type: str
    gpus_per_trial: float
    workers: int
    precision: str
    batch_size: int
    max_concurrent: int
    selected: bool = False  # the placement `tuner tune --cluster` runs on


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: must be a mapping")
    return data


def load_policy(path: Optional[str | Path] = None) -> dict[str, Any]:
    from tuner.model.sizes import SIZES

    file = Path(path) if path else POLICY_FILE
    policy = _read_yaml(file, "placement policy")
    gpus, sizes = policy.get("gpus"), policy.get("sizes")
    if not isinstance(gpus, dict) or not isinstance(sizes, dict):
        raise UserError(f"placement policy {file}: needs `gpus` and `sizes` mappings")
    for name, gpu in gpus.items():
        if not isinstance(gpu, dict) or not {"memory_gb", "bf16"} <= set(gpu):
            raise UserError(f"placement policy {file}: gpus.{name} needs memory_gb and bf16")
    required = {"gpu_types", "gpus_per_worker", "workers", "batch_size", "peak_gb_at_batch"}
    for size, entry in sizes.items():
        if size not in SIZES:
            raise UserError(f"placement policy {file}: unknown size {size!r}; valid: {', '.join(SIZES)}")
        if not isinstance(entry, dict) or not required <= set(entry):
            raise UserError(f"placement policy {file}: sizes.{size} needs {', '.join(sorted(required))}")
        unknown = [g for g in entry["gpu_types"] if g not in gpus]
        if unknown:
            raise UserError(f"placement policy {file}: sizes.{size} names unknown GPU type(s) {', '.join(unknown)}")
    return policy


def cluster_gpus(cluster_file: str | Path) -> dict[str, tuple[str, float]]:
    """{accelerator type: (node type name, GPUs of that type at the cluster's maximum size)}."""
    file = Path(cluster_file)
    cluster = _read_yaml(file, "cluster file")
    node_types = cluster.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        raise UserError(f"cluster file {file}: has no available_node_types")
    found: dict[str, tuple[str, float]] = {}
    for name, node in node_types.items():
        resources = (node or {}).get("resources", {}) or {}
        gpus = float(resources.get("GPU", 0))
        count = int((node or {}).get("max_workers", 1 if name == cluster.get("head_node_type") else 0))
        for key in resources:
            if key.startswith("accelerator_type:") and gpus > 0:
                kind = key.split(":", 1)[1]
                previous = found.get(kind, (name, 0.0))
                found[kind] = (previous[0], previous[1] + gpus * count)
    return found


def plan_placements(size: str, cluster_file: str | Path, policy: Optional[dict[str, Any]] = None) -> list[Placement]:
    policy = policy or load_policy()
    if size not in policy["sizes"]:
        raise UserError(f"placement policy has no entry for size {size!r}")
    entry = policy["sizes"][size]
    available = cluster_gpus(cluster_file)
    placements = []
    for kind in entry["gpu_types"]:
        if kind not in available:
            continue
        node_type, total_gpus = available[kind]
        gpu = policy["gpus"][kind]
        per_trial = entry["gpus_per_worker"] * entry["workers"]
        share_gb = gpu["memory_gb"] * min(1.0, entry["gpus_per_worker"]) * MEMORY_HEADROOM
        per_sample = entry["peak_gb_at_batch"] / entry["batch_size"]
        batch = min(entry["batch_size"], max(8, int(share_gb / per_sample) // 8 * 8))
        placements.append(Placement(
            accelerator_type=kind, node_type=node_type, gpus_per_trial=per_trial, workers=entry["workers"],
            precision="bf16" if gpu["bf16"] else "fp16", batch_size=batch,
            max_concurrent=int(math.floor(total_gpus / per_trial + 1e-9))))
    if not placements:
        raise UserError(f"the cluster has none of the GPU types size {size} may use "
                        f"({', '.join(entry['gpu_types'])})")
    placements[0].selected = True
    return placements


def apply_placement(base: dict[str, dict[str, Any]], placement: Placement) -> dict[str, dict[str, Any]]:
    """Config overrides that pin trials to the placement's GPU type and layout."""
    merged = {section: dict(values) for section, values in base.items()}
    merged.setdefault("resources", {}).update(workers=placement.workers,
                                              gpus_per_worker=placement.gpus_per_trial / placement.workers,
                                              accelerator_type=placement.accelerator_type)
    train = merged.setdefault("train", {})
    # the placement's batch is what one GPU holds; with train.batch_scope=global batch_size counts
    # all the trial's workers
    per_step = placement.workers if train.get("batch_scope") == "global" else 1
    train.update(amp=placement.precision, batch_size=placement.batch_size * per_step)
    return merged


def plan_json(placements: list[Placement]) -> dict[str, Any]:
    return {"placements": [asdict(p) for p in placements]}
