"""The optimizer step: clipping inside the fused AdamW is the same update as clip_grad_norm_."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from tuner.config import load_config
from tuner.data.collate import train_batches
from tuner.data.synthetic import generate
from tuner.losses import MaskedItemObjective
from tuner.model.bert4rec import Bert4Rec
from tuner.model.build import model_config
from tuner.train.optim import build_optimizer
from tuner.errors import UserError
from tuner.train.step import CPP_WRAPPER_MIN_STEPS, CUDA_CPP_WRAPPER, TrainStep, compile_options

ROOT = Path(__file__).resolve().parents[1]


def _train(fused_clip: bool, grad_clip: float, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.max_len=16"])
    data = generate(200, 60, seed=0)
    model = Bert4Rec(model_config(cfg, data.num_items))
    groups = [{k: g[k] for k in ("params", "lr", "weight_decay")}
              for g in build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=True)  # as on a GPU
    step = TrainStep(MaskedItemObjective(model), list(model.parameters()), optimizer, None, None, grad_clip,
                     torch.device("cpu"), fused_clip=fused_clip)
    assert step.fused_clip == fused_clip
    for batch in list(train_batches(data.sequences, data.num_items, 32, 16, 0.3, 0.1, seed=0, epoch=0))[:steps]:
        step(batch)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_clipping_inside_the_fused_optimizer_matches_a_separate_clip():
    separate = _train(fused_clip=False, grad_clip=0.05)  # far below the gradients' norm: clipping acts
    fused = _train(fused_clip=True, grad_clip=0.05)
    unclipped = _train(fused_clip=True, grad_clip=0.0)
    for name, p in separate.items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(unclipped[n], p, rtol=1e-3, atol=1e-5) for n, p in separate.items())


def test_fp16_loss_scaling_keeps_the_separate_clip():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    step = TrainStep(model, list(model.parameters()), optimizer, None, torch.float16, 1.0, torch.device("cpu"))
    assert step.scaler.is_enabled()  # fp16: the loss is scaled, so the clip is unscaled first
    assert step.fused_clip is False


def test_cpp_wrapper_is_on_by_default_only_for_one_cuda_worker_without_graphs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    train = load_config().train
    assert compile_options(train, cuda) == CUDA_CPP_WRAPPER and CUDA_CPP_WRAPPER["cpp_wrapper"] is True
    assert compile_options(train, cpu) is None
    assert compile_options(train, cuda, world_size=4) is None  # DDP: not run across GPUs with it yet
    for mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: no launches left to speed up
        assert compile_options(load_config(overrides=[f"train.compile_mode={mode}"]).train, cuda) is None
    assert compile_options(load_config(overrides=["train.compile_mode=max-autotune-no-cudagraphs"]).train, cuda)
    assert compile_options(load_config(overrides=["train.cpp_wrapper=on"]).train, cpu) == {"cpp_wrapper": True}
    assert compile_options(load_config(overrides=["train.cpp_wrapper=off"]).train, cuda) is None
    with pytest.raises(UserError, match="train.cpp_wrapper='yes' is not one of: auto, on, off"):
        load_config(overrides=["train.cpp_wrapper=yes"])


def test_cpp_wrapper_auto_is_on_for_trials_of_any_length_now_that_its_warm_start_is_no_longer():
    """Without the CPU-ISA checks its warm start is no longer than the Python wrapper's (H200,
    130M): the bar is 0 and even a short trial gets its faster steps; the bar still decides."""
    cuda = torch.device("cuda")
    train = load_config().train
    assert CPP_WRAPPER_MIN_STEPS == 0
    for steps in (1, 500, None):  # None: `tuner bench`'s steady step
        assert compile_options(train, cuda, total_steps=steps) == CUDA_CPP_WRAPPER
    assert compile_options(train, cuda, total_steps=CPP_WRAPPER_MIN_STEPS - 1) is None
    forced = load_config(overrides=["train.cpp_wrapper=on"]).train
    assert compile_options(forced, cuda, total_steps=100) == CUDA_CPP_WRAPPER


def test_the_compiled_step_with_the_cpp_wrapper_trains_as_the_eager_step():
    """torch.compile gets the option (its generated wrapper is C++; without it, Python) and the
    step's arithmetic is unchanged: the same losses and weights as the eager step."""
    def train(compile_mode, options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        objective = _SquaredError(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step = TrainStep(objective, list(model.parameters()), optimizer, None, None, 1.0, torch.device("cpu"),
                         compile_mode, compile_options=options)
        gen = torch.Generator().manual_seed(1)
        losses = [float(step(_Batch(torch.randn(32, 8, generator=gen)))) for _ in range(3)]
        return losses, [p.detach().clone() for p in model.parameters()]

    from torch._inductor.utils import run_and_get_code

    eager_losses, eager_weights = train(None, None)
    # the GPU's settings (no CPU-ISA checks) too: here they build the CPU kernels without vector code
    for options, cpp in ((None, False), ({"cpp_wrapper": True}, True), (CUDA_CPP_WRAPPER, True)):
        (losses, weights), code = run_and_get_code(lambda: train("default", options))
        assert code and all(("CppWrapperCodeCache" in source) == cpp for source in code)
        assert losses == pytest.approx(eager_losses, rel=1e-5)
        for got, want in zip(weights, eager_weights):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# a C++-wrapper step in a process of its own; argv: "bind" (the default) or "nobind" (the control that
# shows the cached backward failing without bind_backward_context). Prints the loss and the number of
# AOTAutograd cache hits (the second process on a cache dir must load the backward from disk)
_CACHED_STEP = """
import sys
import torch
import tuner.train.step as step_module
from tuner.train.step import CUDA_CPP_WRAPPER, TrainStep

if sys.argv[1] == "nobind":
    step_module.bind_backward_context = lambda device: None
torch.manual_seed(0)
cuda = torch.device("cuda")
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(cuda)

class Objective(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, items, positions, labels):
        return (self.model(items) - labels).pow(2).mean()

class Batch:
    def __init__(self, x):
        self.items, self.positions, self.labels = x, None, x.sum(1, keepdim=True)

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
step = TrainStep(Objective(model), list(model.parameters()), optimizer, None, torch.bfloat16, 1.0, cuda,
                 "default", compile_options=CUDA_CPP_WRAPPER)
batch = Batch(torch.randn(32, 64, device=cuda, generator=torch.Generator(cuda).manual_seed(1)))
losses = [float(step(batch)) for _ in range(3)]
torch.cuda.synchronize()
print(losses[-1], torch._dynamo.utils.counters["aot_autograd"]["autograd_cache_hit"])
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the C++ wrapper's context bug is CUDA's")
def test_a_second_process_trains_from_the_cached_cpp_wrapper_step(tmp_path):
    """The next trial on a machine loads the compiled step from inductor's cache. Its C++-wrapper
    backward must run: without a CUDA context bound to autograd's thread it fails (#144609)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [subprocess.run([sys.executable, "-c", _CACHED_STEP, "bind"], env=env, capture_output=True, text=True)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    (first_loss, first_hits), (second_loss, second_hits) = (run.stdout.split() for run in runs)
    assert int(first_hits) == 0 and int(second_hits) > 0  # the second one ran the cached graphs
    assert float(second_loss) == float(first_loss)


class _Batch:
    def __init__(self, x):
        self.items, self.positions, self.labels = x, None, x.sum(1, keepdim=True)


class _SquaredError(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, items, positions, labels):
        return (self.model(items) - labels).pow(2).mean()


def test_the_loop_decides_the_cpp_wrapper_on_the_trials_planned_steps(monkeypatch):
    """train_worker hands compile_options the trial's plan, which `train.cpp_wrapper=auto` decides
    on: epochs x batches per epoch, or train.max_steps where that is sooner. (The compile itself is
    not run: the recorder stops the trial there.)"""
    from tuner.train import loop
    from tuner.train.parallel import local_context
    from tuner.train.reporting import ConsoleReporter

    class Planned(Exception):
        pass

    plans = []

    def record(train, device, world_size=1, total_steps=None):
        plans.append(total_steps)
        raise Planned

    monkeypatch.setattr(loop, "compile_options", record)
    # 600 users, each with a training sequence, in batches of 32: 19 a epoch (the last one short)
    base = ["model.max_len=16", "data.synthetic_users=600", "data.synthetic_items=120", "train.compile=on",
            "train.batch_size=32"]
    for extra in (["train.max_epochs=3"], ["train.max_epochs=3", "train.max_steps=40"],
                  ["train.max_epochs=3", "train.static_shapes=true"]):
        cfg = load_config(overrides=base + extra)
        with pytest.raises(Planned):
            loop.train_worker(cfg, local_context(cfg.train), ConsoleReporter(enabled=False))
    assert plans == [3 * 19, 40, 3 * 19]  # fixed shapes fill the short batch up: as many steps


# compiles one function with the C++ wrapper in a process of its own (the ISA checks' answers are
# cached per process) and prints which CPU vector ISAs inductor checked; argv: "gpu" for the GPU's
# settings (CUDA_CPP_WRAPPER), else the C++ wrapper alone
def _fresh_process(script: str, arg: str, cache_dir, env: Optional[dict] = None) -> object:
    """Runs `script` with `arg` in a new Python process on inductor cache `cache_dir` (with `env`
    added to its environment); the JSON of its last output line."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_TIED_STEP = """
import copyreg, json, sys, types
if "imported_first" in sys.argv[1]:  # a module that imported torch before torch's own modules (a Ray worker's)
    sys.modules["imported_first"] = types.ModuleType("imported_first")
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
import tuner.train.step as step_module
from tuner.data.collate import TrainBatch
from tuner.losses import TiedItemTable

if "imported_first" in sys.argv[1]:
    sys.modules["imported_first"].torch = torch
if sys.argv[1].endswith("format_by_name"):  # as before step.py's memory-format reduction
    copyreg.dispatch_table.pop(torch.memory_format)

if sys.argv[1] == "bypass":  # as before AOT_CACHE_SETTINGS
    step_module.AOT_CACHE_SETTINGS = {}
if sys.argv[1] == "threads_in_key":  # as before SHARED_CACHE_SETTINGS
    step_module.SHARED_CACHE_SETTINGS = {}
if sys.argv[1] == "pinned_unmarked":  # as before SDPA_PIN_FUNCTIONS
    step_module.SHARED_CACHE_SETTINGS = step_module.without_sdpa_marks(step_module.SHARED_CACHE_SETTINGS)


class Tied(torch.nn.Module):  # the objective's shape: rows in, the whole table out as the head
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, items, positions, labels):
        rows, head = TiedItemTable.apply(self.table, items, 8, torch.float32)
        if sys.argv[1].startswith("pinned"):  # attention on SDPA, its backend pinned as the model pins it on a GPU
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                rows = F.scaled_dot_product_attention(rows[:, None], rows[:, None], rows[:, None])[:, 0]
        return F.cross_entropy(rows.mean(1) @ head[:50].t(), labels)


model = Tied()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
step = step_module.TrainStep(model, list(model.parameters()), optimizer, None, None, 1.0, torch.device("cpu"),
                             compile_mode="default")
batch = TrainBatch(torch.arange(1, 25).view(4, 6), torch.zeros(4, dtype=torch.long), torch.tensor([3, 7, 11, 19]), 4)
losses = [step(batch).item() for _ in range(2)]
print(json.dumps({"losses": losses, "aot": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
                  "fx": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}}))
"""


def test_a_new_process_finds_the_step_with_the_tied_table_in_aotautograds_cache(tmp_path):
    """The objective's custom autograd.Function (TiedItemTable) made AOTAutograd's cache pass over
    the step, so every new process (every trial) traced the joint graph again. A second process on
    the same cache now hits it, and trains as the first; the control still bypasses it."""
    first, second = (_fresh_process(_TIED_STEP, "cache", tmp_path / "a") for _ in range(2))
    assert first["aot"].get("autograd_cache_saved", 0) >= 1 and "autograd_cache_bypass" not in first["aot"]
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in second["aot"]
    assert second["losses"] == first["losses"]
    assert _fresh_process(_TIED_STEP, "bypass", tmp_path / "b")["aot"].get("autograd_cache_bypass", 0) >= 1


def test_a_new_process_finds_the_step_that_pins_sdpas_backend_in_aotautograds_cache(tmp_path):
    """Where attention falls back to SDPA on a GPU the model pins its backend with `sdpa_kernel`, and
    AOTAutograd's cache passed over the step: every new process traced the joint graph again. With
    the pinning functions marked cacheable a second process hits it and trains as the first; the
    control, without the marks, still bypasses it."""
    first, second = (_fresh_process(_TIED_STEP, "pinned", tmp_path / "a") for _ in range(2))
    assert first["aot"].get("autograd_cache_saved", 0) >= 1 and "autograd_cache_bypass" not in first["aot"], first
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in second["aot"], second
    assert second["losses"] == first["losses"]
    control = _fresh_process(_TIED_STEP, "pinned_unmarked", tmp_path / "b")
    assert control["aot"].get("autograd_cache_bypass", 0) >= 1, control


def _second_loads_the_first(cache, first: tuple, second: tuple) -> None:
    """Two `_TIED_STEP` processes, (arg, env) each, one after the other on inductor cache `cache`:
    the first compiles the step, the second loads it from AOTAutograd's cache and trains alike."""
    first, second = (_fresh_process(_TIED_STEP, arg, cache, env) for arg, env in (first, second))
    assert first["fx"].get("fxgraph_cache_miss", 0) >= 1  # it compiled (forward, backward, update)
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in second["aot"], second
    assert second["losses"] == first["losses"]


def test_a_process_with_another_thread_count_finds_the_compiled_step(tmp_path):
    """A Ray worker runs with OMP_NUM_THREADS = its CPUs (1 by default), a bare process with the
    machine's: a 1-thread process loads the step a 2-thread process compiled. The control, with
    inductor's thread count in the cache key as before, compiles again."""
    two, one = {"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "1"}
    _second_loads_the_first(tmp_path / "a", ("cache", two), ("cache", one))
    _fresh_process(_TIED_STEP, "threads_in_key", tmp_path / "b", two)
    control = _fresh_process(_TIED_STEP, "threads_in_key", tmp_path / "b", one)
    assert control["aot"].get("autograd_cache_miss", 0) >= 1, control


def test_a_process_that_imported_its_modules_in_another_order_finds_the_compiled_step(tmp_path):
    """A memory format pickles as a bare name that pickle resolves through the first module in
    sys.modules holding `torch`, and the caches hash every static input's memory format: a process
    where another module imported torch first (a Ray worker) now loads the step a plain process
    compiled. The control, with the memory format pickled by name as before, compiles again."""
    _second_loads_the_first(tmp_path / "a", ("cache", None), ("imported_first", None))
    _fresh_process(_TIED_STEP, "format_by_name", tmp_path / "b")
    control = _fresh_process(_TIED_STEP, "imported_first_format_by_name", tmp_path / "b")
    assert control["aot"].get("autograd_cache_miss", 0) >= 1, control


_ISA_CHECKS = """
import json, sys
import torch
import torch._inductor.config as inductor_config
import torch._inductor.cpu_vec_isa as isa
from tuner.train.step import CUDA_CPP_WRAPPER

checks = []
build = isa.VecISA.check_build
isa.VecISA.check_build = lambda self, code: checks.append(str(self)) or build(self, code)
options = CUDA_CPP_WRAPPER if sys.argv[1] == "gpu" else {"cpp_wrapper": True}
with inductor_config.patch(options):
    torch.compile(lambda x: (x.sin() * 2).sum())(torch.randn(64))
print(json.dumps(checks))
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or " avx2 " not in open("/proc/cpuinfo").read(),
                    reason="the control needs a CPU that lists a vector ISA")
def test_the_gpu_cpp_wrapper_skips_the_cpu_isa_checks_each_process_pays(tmp_path):
    """With the C++ wrapper, inductor checks each vector ISA the CPU lists before it builds a module,
    by a probe per ISA (each loaded in a new Python process, which imports torch in the 2.11-era
    source), and every new process checks again. The GPU's settings skip the checks; the control
    does them."""
    assert "avx2" in _fresh_process(_ISA_CHECKS, "cpu", tmp_path / "cpu")
    assert _fresh_process(_ISA_CHECKS, "gpu", tmp_path / "gpu") == []
