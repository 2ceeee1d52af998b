"""The whole step as one CUDA graph (`train.step_graph`, tuner/train/step_graph.py).

When it applies is checked everywhere; the graph itself needs a CUDA device: those tests train
the same tiny model with and without it and compare what a user would see (the weights, the
losses, a learning rate of 0 leaving the weights alone, dropout drawn anew at every step, a
loaded optimizer state taking effect)."""

import copy
import re

import pytest
import torch

from tuner.config import load_config
from tuner.data.collate import train_batches
from tuner.data.synthetic import generate
from tuner.errors import UserError
from tuner.losses import MaskedItemObjective, loss_config
from tuner.model.build import build_model, fused_add_norm
from tuner.train.master_adamw import MasterWeightAdamW
from tuner.train.optim import training_optimizer
from tuner.train.step import TrainStep, compile_options
from tuner.train.step_graph import MIN_BATCHES, WARMUP, resolve_step

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


GRAPHS = ("train.compile_mode=reduce-overhead", "train.static_shapes=true")
BF16 = torch.bfloat16


def _resolved(overrides, device="cuda", workers=1, compiled=True, batches=None):
    cfg = resolve_step(load_config(overrides=list(overrides)), torch.device(device), workers, compiled, batches)
    return cfg.train.step_graph, cfg.train.static_shapes


@pytest.mark.parametrize("overrides, kwargs, expected", [
    ((), {}, ("on", "true")),  # the default on one GPU worker: the whole step as one graph, fixed shapes
    (GRAPHS, {}, ("on", "true")),
    (("train.compile_mode=max-autotune",), {}, ("on", "true")),
    (("train.compile_mode=max-autotune-no-cudagraphs",), {}, ("off", "false")),  # no CUDA graphs asked
    (("train.static_shapes=false",), {}, ("off", "false")),  # batches as they come: plain compile
    (("train.compile_mode=reduce-overhead", "train.static_shapes=false"), {}, ("off", "false")),  # inductor's
    ((), {"device": "cpu"}, ("off", "false")),
    ((), {"workers": 2}, ("off", "false")),  # DDP keeps its launches
    ((), {"compiled": False}, ("off", "false")),
    (("train.step_graph=off",), {}, ("off", "false")),
    (("train.step_graph=off", "train.static_shapes=true"), {}, ("off", "true")),
    ((), {"batches": 7}, ("off", "false")),  # filling the last batch could repeat over 1/8 of an epoch
    ((), {"batches": MIN_BATCHES}, ("on", "true")),
    (("train.static_shapes=true",), {"batches": 1}, ("on", "true")),  # asked for: the share is the user's
    (("train.step_graph=on",), {"batches": 1}, ("on", "true")),
])
def test_when_the_step_is_one_graph(overrides, kwargs, expected):
    assert _resolved(overrides, **kwargs) == expected


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", "true"), ("False", "false"), (True, "true"),
                                             ("on", "true"), ("0", "false")])
def test_static_shapes_takes_auto_or_a_bool(value, expected):
    assert load_config(overrides=[f"train.static_shapes={value}"]).train.static_shapes == expected


def test_a_bad_static_shapes_value_is_named():
    with pytest.raises(UserError, match="^train.static_shapes='sometimes' is not one of: auto, true, false$"):
        load_config(overrides=["train.static_shapes=sometimes"])


@pytest.mark.parametrize("overrides, kwargs, message", [
    ((), {"device": "cpu"}, "needs a CUDA device (this run is on cpu)"),
    ((), {"compiled": False}, "needs train.compile on"),
    (("train.static_shapes=false",), {}, "needs fixed batch shapes (this run has train.static_shapes=false)"),
    ((), {"workers": 4}, "needs one worker (this run has 4)"),
])
def test_step_graph_on_names_what_the_run_lacks(overrides, kwargs, message):
    with pytest.raises(UserError, match="^" + re.escape(f"train.step_graph=on {message}")):
        _resolved(("train.step_graph=on", *overrides), **kwargs)


def test_the_host_bound_choices_follow_the_resolved_step():
    """The C++ wrapper and add_norm's kernels follow whether the step replays CUDA graphs, as
    decided for the run, not the compile mode's name."""
    graph = resolve_step(load_config(), CUDA, 1, True)
    plain = resolve_step(load_config(overrides=["train.static_shapes=false"]), CUDA, 1, True)
    assert compile_options(graph.train, CUDA) is None  # auto: C++ launches only where the host launches
    assert compile_options(plain.train, CUDA) is not None
    assert fused_add_norm(graph) and not fused_add_norm(plain)


def test_the_masters_update_reads_its_learning_rate_from_one_tensor_written_in_place():
    """A captured update keeps reading the tensors it was captured with: each step writes the
    scheduler's learning rate into the same tensor, and the decay once."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = MasterWeightAdamW([{"params": [weight], "weight_decay": 0.1}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
    tensors = None
    for k in range(3):
        weight.grad = torch.ones(4, dtype=weight.dtype)
        optimizer.step()
        group = optimizer.param_groups[0]
        assert float(group["lr_tensor"]) == pytest.approx(1e-2 / (k + 1))
        assert float(group["decay_tensor"]) == pytest.approx(0.1)
        if tensors is None:
            tensors = (group["lr_tensor"], group["decay_tensor"])
        assert group["lr_tensor"] is tensors[0] and group["decay_tensor"] is tensors[1]
        scheduler.step()


# 2^-7, and learning-rate factors of a few bits: every learning rate is the same number as the
# captured fused AdamW's fp32 lr tensor and as the uncaptured one's float
LR = 2.0 ** -7
AMP = {None: "off", BF16: "bf16", torch.float16: "fp16"}  # autocast's dtype -> train.amp


def _setup(graph: bool, weights: str = "fp32", dropout: float = 0.0, grad_clip: float = 1.0, factors=None,
           steps: int = 10, overrides: tuple = (), dtype=BF16):
    """A tiny model's step on CUDA, compiled, with or without the step graph, and `steps` batches.
    `factors[k]`: the learning rate's factor at step k (1 after the list). `overrides`: further
    config (an objective, iLoRA); `dtype`: autocast's (None: fp32 throughout)."""
    cfg = load_config(overrides=["model.size=tiny", f"model.dropout={dropout}", f"model.attn_dropout={dropout}",
                                 f"train.weights={weights}", *GRAPHS, f"optim.grad_clip={grad_clip}",
                                 f"optim.lr={LR}", f"train.amp={AMP[dtype]}", *overrides])
    data = generate(400, 80, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_items, pretrained=False).to(CUDA)
    objective = MaskedItemObjective(model, loss_config(cfg.train)).to(CUDA)
    optimizer = training_optimizer(model, cfg, dtype, CUDA, compile=True)
    factors = factors or []
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factors[k] if k < len(factors) else 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(objective, params, optimizer, scheduler, dtype, grad_clip, CUDA, "reduce-overhead",
                     step_graph=graph)
    batches = [b.to(CUDA) for b in train_batches(data.sequences, data.num_items, 32, cfg.model.max_len, 0.2, 0.1,
                                                 seed=0, epoch=0, static_shapes=True)][:steps]
    assert len(batches) == steps
    return model, optimizer, scheduler, step, batches


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def assert_same_training(got: dict, expected: dict, start: dict, share: float = 1e-2) -> None:
    """The weights' distance from `expected` (all of them as one vector) is under `share` of how
    far training moved them from `start`. Not bitwise: the embedding gradient's atomic adds sum in
    any order, and through bf16 casts of fp32 weights AdamW carries that rounding on. On an H200
    two uncaptured fp32 runs ended 2.6e-4 of the move apart in the item table, and up to 1.3x in
    the key projection's bias, whose gradient is zero but for rounding (softmax ignores a shift)."""
    moved = sum(float((value - start[name]).norm()) ** 2 for name, value in expected.items()) ** 0.5
    off = sum(float((got[name] - value).norm()) ** 2 for name, value in expected.items()) ** 0.5
    assert moved > 0, "training left the weights where they started (fp16: every step skipped?)"
    assert off <= share * moved, f"the weights ended {off:.3g} from the expected ones, which moved {moved:.3g}"


# what a trial may train, each without random draws (iLoRA's adapter dropout off): captured whole, the
# same training as the step it captures
DETERMINISTIC = {
    "fp32 weights (fused AdamW)": {"weights": "fp32"},
    "bf16 weights (MasterWeightAdamW)": {"weights": "bf16"},
    "fp32 without autocast": {"dtype": None},
    "fp16 with loss scaling (fused AdamW)": {"dtype": torch.float16},
    # the residual stream in fp16, so the adds and norms run on add_norm's kernels in fp16
    "fp16 with an fp16 residual stream": {"dtype": torch.float16, "overrides": ("model.residual=half",)},
    "focal loss": {"overrides": ("train.loss=focal",)},
    "cut cross-entropy": {"overrides": ("train.loss=cce",)},
    "iLoRA, history router": {"overrides": ("ilora.enabled=true", "ilora.dropout=0")},
    "iLoRA, encoder router": {"overrides": ("ilora.enabled=true", "ilora.dropout=0", "ilora.router=encoder")},
}


@needs_cuda
@pytest.mark.parametrize("setup", DETERMINISTIC.values(), ids=DETERMINISTIC.keys())
def test_the_step_graph_trains_as_the_step_it_captures(setup):
    factors = [0.25, 0.5, 1.0, 0.5, 1.5, 0.25, 2.0, 1.0, 0.125, 1.0]  # the lr moves at every step
    runs = {}
    for graph in (False, True):
        model, _, _, step, batches = _setup(graph, grad_clip=0.05, factors=factors, **setup)  # clipping acts
        start = _weights(model)
        losses = [float(step(b)) for b in batches]
        runs[graph] = losses, _weights(model)
        assert (step.graph is not None and step.graph.captured) is graph
    (plain_losses, plain), (graph_losses, graphed) = runs[False], runs[True]
    assert graph_losses == pytest.approx(plain_losses, rel=1e-3)
    assert_same_training(graphed, plain, start)


# objectives that draw negatives at every step: the draws differ from the uncaptured run's, so a
# replay is checked for what it must do (draw anew each time, train)
SAMPLED = {
    "CE-, uniform, shared": ("train.loss=sampled_ce",),
    "CE-, popularity, per position": ("train.loss=sampled_ce", "train.negative_sampling=popularity",
                                      "train.shared_negatives=false"),
    "CCE-": ("train.loss=cce_sampled",),
    "iLoRA with adapter dropout": ("ilora.enabled=true", "ilora.dropout=0.3"),
}


@needs_cuda
@pytest.mark.parametrize("overrides", SAMPLED.values(), ids=SAMPLED.keys())
def test_a_replay_draws_anew_and_trains(overrides):
    """lr 0 after the capture: one batch's loss differs at every replay (fresh draws) while no
    weight moves; lr back on: the replays move the weights."""
    factors = [1.0] * WARMUP + [0.0] * 4
    model, _, _, step, batches = _setup(True, factors=factors, steps=WARMUP + 4, overrides=overrides)
    for batch in batches[:WARMUP]:
        step(batch)
    frozen = _weights(model)
    losses = {float(step(batches[0])) for _ in range(4)}
    assert step.graph.captured
    assert len(losses) == 4, losses
    assert all(torch.equal(v, frozen[n]) for n, v in _weights(model).items())
    before = float(step(batches[1]))
    for _ in range(20):  # lr factor 1 again: the same batch, learnt
        step(batches[1])
    assert float(step(batches[1])) < before


def test_fp16_loss_scaling_is_captured_only_with_an_optimizer_that_takes_its_found_inf():
    """GradScaler reads the overflow check on the host for an optimizer without
    `_step_supports_amp_scaling`; such a step is refused before any capture, in one line."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="^train.step_graph with fp16 loss scaling needs an optimizer that takes "
                                           r"the scaler's found_inf \(the fused AdamW\), not SGD$"):
        TrainStep(model, list(model.parameters()), optimizer, None, torch.float16, 1.0, torch.device("cpu"),
                  step_graph=True)


@needs_cuda
def test_an_overflowing_fp16_replay_skips_its_update_and_backs_off_the_scale():
    """fp16: the loss scale is the scaler's device tensor, read by the graph. A replay whose
    gradients overflow (scale 2^60) leaves every weight as it was and halves the scale, on the
    device; at a sane scale the next replay trains."""
    model, _, _, step, batches = _setup(True, steps=WARMUP + 3, dtype=torch.float16)
    for batch in batches[:WARMUP + 1]:  # the last of them is captured and replayed
        step(batch)
    assert step.graph.captured
    before = _weights(model)
    step.scaler.update(2.0 ** 60)  # in place: the tensor the graph reads
    step(batches[WARMUP + 1])
    assert all(torch.equal(v, before[n]) for n, v in _weights(model).items())
    assert step.scaler.get_scale() == 2.0 ** 59
    step.scaler.update(2.0 ** 10)
    step(batches[WARMUP + 2])
    assert any(not torch.equal(v, before[n]) for n, v in _weights(model).items())
    assert step.scaler.get_scale() == 2.0 ** 10


@needs_cuda
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_replay_reads_the_learning_rate_of_its_step(weights):
    """Captured at lr factor 1, a replayed step at factor 0 changes no weight; at 1 it does."""
    factors = [1.0] * (WARMUP + 1) + [0.0, 1.0]
    model, _, _, step, batches = _setup(True, weights, factors=factors, steps=WARMUP + 3)
    for batch in batches[:WARMUP + 1]:  # the last of them is captured and replayed
        step(batch)
    before = _weights(model)
    step(batches[WARMUP + 1])
    after_zero = _weights(model)
    step(batches[WARMUP + 2])
    after_one = _weights(model)
    for name, value in before.items():
        assert torch.equal(after_zero[name], value), name
    assert any(not torch.equal(after_one[n], v) for n, v in after_zero.items())


# each kind of dropout alone, so one frozen inside the graph cannot hide behind another that draws
# anew: the hidden one (residual branches) on add_norm's kernels and on inductor's code, and the
# attention weights' inside the attention kernel: Triton's, and SDPA's memory-efficient one, which
# fp32 runs and GPUs older than sm80 (V100s, fp16 and now captured) get (the embeddings' dropout,
# inductor's code in every case, is switched off by the test)
DROPOUTS = {
    "hidden, add_norm's kernels": (0.3, ("model.attn_dropout=0",)),
    "hidden, inductor's code": (0.3, ("model.attn_dropout=0", "model.fused_add_norm=off")),
    "attention weights": (0.0, ("model.attn_dropout=0.3",)),
    "attention weights, SDPA's kernel": (0.0, ("model.attn_dropout=0.3", "model.attention=efficient")),
}


@needs_cuda
@pytest.mark.parametrize("dropout, overrides", DROPOUTS.values(), ids=DROPOUTS.keys())
def test_dropout_is_drawn_anew_at_every_replay(dropout, overrides):
    """lr 0 after the capture: the weights stay put, so only dropout can move the loss of one batch.
    The embeddings' dropout (inductor's code whatever the case) is off, so it cannot hide a frozen
    mask of the kind under test."""
    factors = [1.0] * WARMUP + [0.0] * 6
    model, _, _, step, batches = _setup(True, dropout=dropout, factors=factors, steps=WARMUP + 6,
                                        overrides=overrides)
    model.emb_dropout.p = 0.0  # before the first step compiles the model
    for batch in batches[:WARMUP]:
        step(batch)
    frozen = _weights(model)
    losses = {float(step(batches[0])) for _ in range(6)}
    assert len(losses) == 6, losses
    assert all(torch.equal(v, frozen[n]) for n, v in _weights(model).items())


@needs_cuda
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_loaded_optimizer_state_is_what_the_next_replays_update(weights):
    """Loading a state replaces the tensors a graph read: the graph is dropped and captured again,
    so training from an earlier state goes on as it would have from there."""
    resumed = WARMUP + 1  # captured by then
    model, optimizer, scheduler, step, batches = _setup(True, weights, steps=resumed + 5)
    start = _weights(model)
    for batch in batches[:resumed]:
        step(batch)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    for batch in batches[resumed:resumed + 3]:
        step(batch)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    assert not step.graph.captured
    for batch in batches[resumed + 3:]:
        step(batch)
    assert step.graph.captured

    reference, _, _, plain, _ = _setup(False, weights, steps=resumed + 5)
    for batch in batches[:resumed] + batches[resumed + 3:]:
        plain(batch)
    assert_same_training(_weights(model), _weights(reference), start)
