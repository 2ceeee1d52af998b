"""iLoRA: what trains, what stays frozen, the router, compile-friendliness, and fine-tuning from a
pretrained checkpoint or a registered MLflow model."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_serving import registered  # noqa: F401 (module fixture: a registered tiny model)
from tuner.config import load_config
from tuner.losses import MaskedItemObjective
from tuner.model.build import build_model
from tuner.model.ilora import IloraSpec, MoELoRALinear, adapter_parameters, apply_ilora
from tuner.train.loop import train_worker
from tuner.train.optim import build_optimizer
from tuner.train.parallel import local_context
from tuner.train.reporting import ConsoleReporter

TINY = ["model.max_len=16", "data.synthetic_users=600", "data.synthetic_items=120", "eval.num_negatives=20"]


def _batch(num_items: int, mask_token: int, batch: int = 8, length: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (batch, length), generator=g)
    positions = torch.arange(batch) * length + length - 1  # flat indices of the masked slots
    labels = items[:, -1].clone()
    items[:, -1] = mask_token
    return items, positions, labels


def test_only_adapters_and_router_change_and_every_adapter_learns():
    cfg = load_config(overrides=TINY + ["ilora.enabled=true", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = build_model(cfg, 120)
    adapters = adapter_parameters(model)
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    # 2 layers x (q, k, v, o, up, down), each with A and B, plus the router's weight and bias
    assert sum(isinstance(m, MoELoRALinear) for m in model.modules()) == 12 and len(adapters) == 26
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = MaskedItemObjective(model, "ce")
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    items, positions, labels = _batch(120, model.cfg.mask_token)
    grads = {}
    for _ in range(2):  # B starts at zero, so A's gradient is zero until B has moved once
        optimizer.zero_grad()
        objective(items, positions, labels).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    assert set(grads) == set(adapters)
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in adapters), name


def test_different_histories_get_different_expert_weights():
    cfg = load_config(overrides=TINY + ["ilora.enabled=true"])
    torch.manual_seed(0)
    model = build_model(cfg, 120).eval()
    a, _, _ = _batch(120, model.cfg.mask_token, seed=1)
    b, _, _ = _batch(120, model.cfg.mask_token, seed=2)
    gates = model.router(model, torch.cat([a[:1], b[:1]]))
    assert gates.shape == (2, 4) and torch.allclose(gates.sum(-1), torch.ones(2))
    assert not torch.allclose(gates[0], gates[1])
    # the history router sees neither padding nor mask tokens
    padded = a[:1].clone()
    padded[0, :4] = 0
    masked = padded.clone()
    masked[0, :4] = model.cfg.mask_token
    assert torch.allclose(model.router(model, padded), model.router(model, masked))


def test_adapters_start_as_the_base_model_and_trace_without_graph_breaks():
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    base = build_model(cfg, 120).eval()
    adapted = apply_ilora(copy.deepcopy(base), IloraSpec(router="encoder")).eval()
    items, _, _ = _batch(120, base.cfg.mask_token)
    assert torch.allclose(adapted(items), base(items), atol=1e-6)  # B = 0: no change at the start
    torch._dynamo.reset()
    compiled = torch.compile(adapted, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    assert torch.allclose(compiled(items), adapted(items), atol=1e-6)


def test_ilora_130M_trains_under_two_percent_of_the_parameters():
    proc = subprocess.run([sys.executable, "-m", "tuner", "train", "--size", "130M", "--ilora", "--synthetic-items",
                           "159750", "--synthetic-users", "300", "--max-steps", "2", "--batch-size", "32",
                           "--set", "eval.num_negatives=20", "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_items"] == 159750
    assert 0 < result["trainable_params"] < 0.02 * result["total_params"], result


def test_fine_tune_from_a_checkpoint_starts_from_its_weights(tmp_path):
    pre = load_config(overrides=TINY + ["train.max_epochs=2", f"train.checkpoint_dir={tmp_path / 'pre'}"])
    train_worker(pre, local_context(pre.train), ConsoleReporter(enabled=False))
    from tuner.serving import load_model

    pretrained = load_model(tmp_path / "pre").state_dict()
    cfg = load_config(overrides=TINY + ["ilora.enabled=true", f"train.init_from={tmp_path / 'pre'}"])
    model = build_model(cfg, 120)
    for name, value in pretrained.items():
        own = name.replace("_proj.weight", "_proj.base.weight").replace("_proj.bias", "_proj.base.bias") \
            if "blocks" in name else name
        assert torch.equal(model.state_dict()[own], value), name
    # a short iLoRA run from it trains, tests and reports its parameter counts
    cfg.train.max_epochs = 1
    result = train_worker(cfg, local_context(cfg.train), ConsoleReporter(enabled=False))
    n_adapters = sum(p.numel() for p in adapter_parameters(build_model(cfg, 120, pretrained=False)).values())
    assert result["trainable_params"] == n_adapters < result["total_params"] and result["test_hr_10"] > 0


def test_fine_tune_from_a_registered_mlflow_model(registered):  # noqa: F811
    from tuner.serving import load_model

    cfg = load_config(overrides=["data.synthetic_users=600", "data.synthetic_items=120", "model.max_len=16",
                                 "ilora.enabled=true", f"train.init_from={registered['model_uri']}",
                                 f"tracking.tracking_uri={registered['uri']}"])
    model = build_model(cfg, 120)
    assert torch.equal(model.item_emb.weight, load_model(registered["ckpt"]).item_emb.weight)


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/ckpt", "no such checkpoint or MLflow model URI"),
    ("models:/never-registered/1", "cannot fetch it"),
])
def test_bad_init_from_is_one_clean_line(tmp_path, source, message):
    proc = subprocess.run([sys.executable, "-m", "tuner", "train", "--ilora", "--init-from", source,
                           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                           "--max-epochs", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_init_from_another_size_is_refused(tmp_path):
    pre = load_config(overrides=TINY + ["train.max_epochs=1", f"train.checkpoint_dir={tmp_path / 'pre'}"])
    train_worker(pre, local_context(pre.train), ConsoleReporter(enabled=False))
    proc = subprocess.run([sys.executable, "-m", "tuner", "train", "--size", "bert4rec", "--init-from",
                           str(tmp_path / "pre"), "--synthetic-users", "600", "--synthetic-items", "120",
                           "--max-epochs", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "trained as" in proc.stderr, proc.stderr


def test_tune_ilora_searches_the_adapters_own_space(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tuner", "tune", "--ilora", "--dry-run", "--json", "--storage",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(plan["search_space"]) == {"optim.lr", "ilora.dropout", "optim.weight_decay", "ilora.rank",
                                         "ilora.experts"}
