"""tuner.model.add_norm's residual dropout + add + LayerNorm kernels, run by Triton's interpreter
on the CPU (no GPU in CI).

`tests/add_norm_check.py` runs in its own process (TRITON_INTERPRET must be set before the
kernels are defined). It checks the op's two outputs and four gradients against float64 PyTorch
with the kernels' own dropout mask (fp32, fp16, a width that is not a power of two, a residual
and a branch of different dtypes, no gradient on the sum, with and without the branch's bias),
that the mask repeats for a seed and changes with it, and that `model.fused_add_norm` gives the
same hidden states and gradients as PyTorch's ops, eagerly and under torch.compile, with both
kernels in the run. The GPU timings come from benchmarks/gpu_throughput.py (`_unfused_add_norm`).
"""

import pytest

pytest.importorskip("triton")

from tests.triton_helpers import interpreted  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return interpreted("add_norm_check.py")


@pytest.mark.parametrize("case", ["fp32", "fp32_dropout", "fp16_dropout", "mixed_no_grad_s", "no_branch_bias"])
def test_op_matches_pytorch_with_its_mask(result, case):
    r = result[case]
    assert len(r["grads"]) == (4 if case == "no_branch_bias" else 5)  # the branch's bias, where given
    bound = 2e-3 if "fp16" in case or case.startswith("mixed") else 1e-6  # fp16 outputs are rounded
    assert r["s"] < bound and r["y"] < bound, r
    assert all(err < bound for err in r["grads"].values()), r
    # the sum and the norm come in the wider input dtype; each gradient in its input's dtype
    wide = "torch.float16" if case == "fp16_dropout" else "torch.float32"
    assert r["dtypes"] == [wide, wide]
    if case == "mixed_no_grad_s":
        assert r["grad_dtypes"] == ["torch.float32", "torch.float16"] + ["torch.float32"] * 3


@pytest.mark.parametrize("case", ["fp32_dropout", "fp16_dropout", "mixed_no_grad_s"])
def test_dropout_mask(result, case):
    r = result[case]
    p = {"fp32_dropout": 0.25, "fp16_dropout": 0.1, "mixed_no_grad_s": 0.2}[case]
    assert abs(r["kept_fraction"] - (1 - p)) < 0.04, r  # hundreds of elements per case
    assert r["mask_repeats"] and r["forward_repeats"] and r["mask_differs_by_seed"]
    assert r["dropped_where_masked"]
    # rows, columns and seeds draw independently: a repeated draw would agree 0.18-0.375 more often
    # than chance at these rates (the masks are fixed for a seed, so the figures do not vary by run)
    assert all(abs(v) < 0.08 for v in r["excess_agreement"].values()), r["excess_agreement"]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("case, grads", [("model", 50), ("rows", 30)])
def test_model_on_the_kernels_matches_pytorch_ops(result, case, grads, mode):
    """`model`: every position; `rows`: forward(rows=...) with the last block pruned to the scored
    rows, against PyTorch's ops over every position, picked after."""
    r = result[case][mode]
    assert r["grads"] > grads and r["missing"] == 0
    assert r["hidden"] < 1e-5 and r["grad"] < 1e-4, r
    assert r["ops"] == ["tuner::dropout_add_norm", "tuner::dropout_add_norm_backward"], r["ops"]


def test_model_dropout_draws_a_new_mask_each_call_and_eval_is_deterministic(result):
    assert result["model"]["dropout_changes_outputs"] and result["model"]["eval_repeats"]


def test_trials_with_another_dropout_share_the_compiled_graph_on_the_kernels(result):
    """The kernels read the dropout rate from a tensor: a second model with another rate compiles
    its forward and backward from the first one's cache entries (a float rate missed)."""
    assert result["cache"]["on_kernels"]
    assert result["cache"]["second_hits"] >= 2 and result["cache"]["second_misses"] == 0, result["cache"]
