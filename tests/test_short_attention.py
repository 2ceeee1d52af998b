"""The Triton attention kernels (short_attention's, and tiled_attention's over 128 positions), run
by Triton's interpreter on the CPU (no GPU in CI).

`tests/short_attention_check.py` runs in its own process, because TRITON_INTERPRET must be set
before the kernels are defined. It checks the custom op against float64 attention with the
kernels' own dropout mask (fp32 and fp16, lengths that are and are not a power of two, a strided
QKV input, a sequence of padding only), that the mask repeats for a seed and changes with it, and
that `model.attention=triton` gives the same hidden states and gradients as the math kernel,
eagerly and under torch.compile with the backward on the kernel, with and without iLoRA experts
on the projections, and that `export_scorer` exports the model on SDPA (no custom op in the
graph). The GPU timings come from benchmarks/attention_backends.py and benchmarks/gpu_throughput.py.
"""

import math

import pytest

pytest.importorskip("triton")

from tests.triton_helpers import interpreted  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return interpreted("short_attention_check.py")


KERNEL_CASES = ["fp32", "fp32_dropout", "fp16_dropout", "short",
                # over 128 positions (150, 200, 131): the tiled kernels
                "tiled_fp32", "tiled_fp32_dropout", "tiled_fp16_dropout",
                # the forward, dQ and dK/dV kernels each on their own tiles
                "tiled_mixed_tiles"]
DROPOUT_CASES = {"fp32_dropout": 0.25, "fp16_dropout": 0.1, "short": 0.1, "tiled_fp32_dropout": 0.25,
                 "tiled_fp16_dropout": 0.1, "tiled_mixed_tiles": 0.25}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_attention_with_its_mask(result, case):
    r = result[case]
    bound = 1e-3 if "fp16" in case else 1e-6  # fp16 inputs: P and dS are rounded for the products
    assert r["out"] < bound and r["grad"] < bound, r
    # a sequence of padding only attends to nothing: zeros, where SDPA gives NaN
    assert r["padding_only_zero"]


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_mask(result, case):
    r = result[case]
    p = DROPOUT_CASES[case]
    # the kept share is 1 - p within 4.5 standard deviations of a binomial share over the case's
    # weights (81 in "short", thousands in the others)
    assert abs(r["kept_fraction"] - (1 - p)) < 4.5 * math.sqrt(p * (1 - p) / r["weights"]), r
    assert r["mask_repeats"] and r["forward_repeats"] and r["mask_differs_by_seed"]
    # the batch, heads, query rows, key columns and seeds draw independently: a repeated draw would
    # agree 0.18-0.375 more often than chance at these rates (fixed masks: no run-to-run spread)
    assert all(abs(v) < 0.08 for v in r["excess_agreement"].values()), r["excess_agreement"]


SHORT_OPS = ["tuner::short_attention", "tuner::short_attention_backward"]
TILED_OPS = ["tuner::tiled_attention", "tuner::tiled_attention_backward"]


@pytest.mark.parametrize("model, ops", [("model", SHORT_OPS), ("model_ilora", SHORT_OPS), ("tiled_model", TILED_OPS)])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_model_on_the_kernel_matches_math_attention(result, model, ops, mode):
    r = result[model][mode]
    assert r["grads"] > 0 and r["missing"] == 0
    assert r["hidden"] < 1e-5 and r["grad"] < 1e-4, r
    # forward and backward both ran on the kernels (the compiled graph's backward too); a model
    # of 140 positions on the tiled ones
    assert r["ops"] == ops, r["ops"]


def test_export_uses_sdpa_so_the_graph_runs_without_this_package(result):
    r = result["export"]
    # the same model runs on the kernels outside export (add_norm's stand down in export too)
    assert r["eager_ops"] == ["tuner::dropout_add_norm", "tuner::short_attention"]
    assert r["exported_custom_ops"] == [] and r["exported_sdpa"]
    assert r["scores"] < 1e-5


@pytest.mark.parametrize("case, ops", [("cache", SHORT_OPS), ("tiled_cache", TILED_OPS)])
def test_trials_with_another_attention_dropout_share_the_compiled_graph(result, case, ops):
    """The second trial of a search over `model.attn_dropout` loads the first one's compiled forward
    and backward from inductor's cache (the rate was a float argument of the kernels, a constant
    of the graph, until session 20: every new rate compiled from scratch), and its step runs the
    kernels with dropout. `tiled_cache`: sequences of 140 positions, where the model used SDPA
    (its dropout a float) until session 24's tiled kernels."""
    r = result[case]
    assert r["hits"] >= 2 and r["misses"] == 0, r
    assert r["ops"] == ops, r


def test_the_kernels_take_sequences_up_to_512_positions(result):
    """Up to 128 positions short_attention's kernels, 129 to 512 the tiled ones; longer goes to SDPA."""
    assert result["usable"] == {"128": True, "129": True, "512": True, "513": False}
