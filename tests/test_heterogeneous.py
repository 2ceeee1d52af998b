"""A heterogeneous GPU cluster simulated on one machine: several real Ray nodes, each with logical
GPUs and an `accelerator_type:<T>` resource standing for its GPU type. `tuner tune --cluster`
runs real trials there (on the CPU, with `train.device=cpu`); each trial records the GPU type of
the node it ran on and its precision in MLflow, and both must agree with the dry-run plan."""

import os

import pytest
import yaml

from tests.tune_helpers import last_json, mlflow_runs, run_tuner

NODES = {"a100": ("A100", 1), "v100": ("V100", 2), "l4": ("L4", 1)}  # node type: (GPU type, GPUs)
# a model named 430M for placement but tiny in shape, so it trains on 2 CPU cores
SMALL_MODEL = ["--set", "model.hidden=16", "--set", "model.heads=1", "--set", "model.layers=1",
               "--set", "model.ffn=32", "--set", "model.max_len=16"]
RUN = ["--synthetic-users", "300", "--synthetic-items", "80", "--num-samples", "2", "--max-epochs", "1",
       "--set", "train.device=cpu", "--set", "eval.num_negatives=20", "--set", "resources.cpus_per_worker=1"]


def cluster_file(path, node_types):
    spec = {"cluster_name": "sim", "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 0}}}
    for name in node_types:
        kind, gpus = NODES[name]
        spec["available_node_types"][name] = {
            "resources": {"CPU": 8, "GPU": gpus, f"accelerator_type:{kind}": 1}, "min_workers": 1, "max_workers": 1}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def simulated_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for kind, gpus in NODES.values():
        cluster.add_node(num_cpus=8, num_gpus=gpus, resources={f"accelerator_type:{kind}": 1})
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


def trials(uri, experiment):
    _, _, children = mlflow_runs(uri, experiment)
    return [(c.data.tags.get("tuner.accelerator_type"), c.data.tags.get("tuner.precision"), c.data.params,
             c.data.tags.get("tuner.worker_niceness")) for c in children]


@pytest.mark.slow
@pytest.mark.parametrize("size, node_types, kind, precision, run_precision", [
    ("430M", ["a100", "v100", "l4"], "A100", "bf16", "bfloat16"),  # 430M only where it fits
    ("tiny", ["v100"], "V100", "fp16", "float16"),  # V100 has no bf16: fp16 + GradScaler
])
def test_trials_run_where_the_plan_says(simulated_cluster, tmp_path, size, node_types, kind, precision,
                                        run_precision):
    spec = cluster_file(tmp_path / "cluster.yaml", node_types)
    plan = last_json(run_tuner("tune", "--cluster", str(spec), "--size", size, "--dry-run", "--json"))
    selected = next(p for p in plan["placements"] if p["selected"])
    if size == "430M":
        assert [p["accelerator_type"] for p in plan["placements"]] == ["A100"]  # never V100 or L4
    assert (selected["accelerator_type"], selected["precision"]) == (kind, precision)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"RAY_ADDRESS": simulated_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    summary = last_json(run_tuner(
        "tune", "--cluster", str(spec), "--size", size, "--tracking-uri", uri, "--storage", str(tmp_path / "ray"),
        "--experiment", f"sim-{size}", "--json", *RUN, *(SMALL_MODEL if size == "430M" else []), env=env,
        timeout=400))
    assert summary["num_trials"] == 2 and summary["trials_error"] == 0
    ran = trials(uri, f"sim-{size}")
    assert len(ran) == 2
    for node_kind, run_dtype, params, niceness in ran:
        assert node_kind == kind and run_dtype == run_precision
        # the cluster's raylets start workers at nice 15; the trial's Train worker asks for 0
        assert niceness == "0"
        assert params["train.amp"] == precision and int(params["train.batch_size"]) == selected["batch_size"]
        assert params["resources.accelerator_type"] == kind
        assert float(params["resources.gpus_per_worker"]) * int(params["resources.workers"]) == \
            selected["gpus_per_trial"]
    assert os.environ.get("RAY_ADDRESS") is None  # the test did not leak the address
