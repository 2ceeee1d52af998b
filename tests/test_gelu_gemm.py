"""tuner.model.gelu_gemm's GEMMs with GELU epilogues, run by Triton's interpreter on the CPU (no
GPU in CI).

`tests/gelu_gemm_check.py` runs in its own process (TRITON_INTERPRET must be set before the
kernels are defined). It checks the feed-forward op's output and four gradients against float64
PyTorch and against PyTorch in the op's own dtype (fp32; fp16, whose roundings the kernels copy),
with rows and columns that are not whole tiles, and that `model.fused_ffn` gives the same hidden
states and gradients as PyTorch's ops, eagerly and under torch.compile, through the model's
plain blocks and through add_norm's. The GPU timings come from benchmarks/gelu_gemm.py and
benchmarks/gpu_throughput.py (`_fused_ffn`).
"""

import pytest

pytest.importorskip("triton")

from tests.triton_helpers import interpreted  # noqa: E402

NAMES = ["x", "up_weight", "up_bias", "down_weight"]


@pytest.fixture(scope="module")
def result():
    return interpreted("gelu_gemm_check.py")


def test_fp32_op_matches_float64_pytorch(result):
    r = result["fp32"]
    assert r["out"] < 1e-6 and r["act"] < 1e-6, r
    assert sorted(r["grads"]) == sorted(NAMES) and all(err < 1e-6 for err in r["grads"].values()), r
    assert r["shapes"] == [[37, 48], [37, 48]]  # pre and act kept for the backward: [rows, ffn]


def test_fp16_op_rounds_as_pytorch_does_in_its_dtype(result):
    r = result["fp16"]
    assert r["out"] < 2e-3 and all(err < 2e-3 for err in r["grads"].values()), r  # fp16 rounding
    # against PyTorch in fp16: the same roundings, so far closer than to float64
    assert r["out_vs_same_dtype"] < 1e-4 and all(err < 2e-4 for err in r["grads_vs_same_dtype"].values()), r
    assert r["grad_dtypes"] == ["torch.float16"] * 4


@pytest.mark.parametrize("case", ["model", "model_add_norm"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_model_on_the_kernels_matches_pytorch_ops(result, case, mode):
    r = result[case][mode]
    assert r["grads"] > 30 and r["missing"] == 0
    assert r["hidden"] < 1e-5 and r["grad"] < 1e-4, r
    ops = ["tuner::gelu_ffn", "tuner::gelu_ffn_backward"]
    if case == "model_add_norm":
        ops = ["tuner::dropout_add_norm", "tuner::dropout_add_norm_backward", *ops]
    assert r["ops"] == ops, r["ops"]
