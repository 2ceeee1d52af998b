"""The Triton cross-entropy passes over materialised logits (tuner.ce_kernel), run by Triton's
interpreter on the CPU (no GPU in CI): `tests/ce_kernel_check.py` runs in its own process, because
TRITON_INTERPRET must be set before the kernels are defined. The H100 check is the same script
with `--cuda` (benchmarks/results/ce_kernel_cuda.json)."""

import re

import pytest

pytest.importorskip("triton")

from tests.triton_helpers import interpreted  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return interpreted("ce_kernel_check.py")


@pytest.mark.parametrize("mode", ["float64", "float64_unsplit"])  # rows split and combined; one program per row
def test_rows_match_float64(result, mode):
    assert result[mode]["rows"] < 1e-6 and result[mode]["lse"] < 1e-6


@pytest.mark.parametrize("case", ["fp32", "fp32_unsplit", "focal_fp32", "compiled_fp32", "bf16"])
def test_loss_and_gradients_match_pytorch(result, case):
    """ce (and focal, through the same rows) on the kernels against inductor's / eager PyTorch's
    code, with ignored rows, a -inf padding column and a catalog that is not a tile multiple."""
    r = result[case]
    bound = 1e-5 if "fp32" in case else 1e-2  # bf16: the logits' and gradients' rounding
    for key in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
        assert r[key] < bound, (case, key, r[key])
    assert r["padding_bias_grad"] == 0.0  # a -inf column takes no gradient
    assert r["ignored_rows_grad"] == 0.0  # a padding slot's row takes none either
    assert 5 < r["loss_value"] < 10  # about log(300): the check ran on real losses


def test_a_few_rows_narrower_than_one_block_match(result):
    """3 rows (one ignored) of 37 columns: the split forward's programs past the last column block
    and past the last row leave the rows and their gradients as PyTorch computes them."""
    assert result["float64_tiny"]["rows"] < 1e-6 and result["float64_tiny"]["lse"] < 1e-6
    r = result["fp32_tiny"]
    assert all(r[key] < 1e-5 for key in ("loss", "grad_hidden", "grad_weight", "grad_bias")), r
    assert r["padding_bias_grad"] == 0.0 and 2 < r["loss_value"] < 6  # about log(37)
    assert r["ignored_rows_grad"] == 0.0


def test_compiled_ce_calls_the_kernels(result):
    assert result["ops"] == ["tuner.catalog_ce.default", "tuner.catalog_ce_backward.default"]


_SIGNATURES = {
    "_ce_forward_kernel": ({"L": "*bf16", "B": "*bf16", "T": "*i32", "ROWS": "*fp32", "LSE": "*fp32",
                            "PART_M": "*fp32", "PART_S": "*fp32", "N": "i32", "V": "constexpr",
                            "stride_l": "constexpr", "BLOCK_R": "constexpr", "BLOCK": "constexpr",
                            "SPLIT": "constexpr", "STAGES": "constexpr"},
                           {"V": 159_752, "stride_l": 159_752}),
    "_ce_backward_kernel": ({"L": "*bf16", "B": "*bf16", "T": "*i32", "LSE": "*fp32", "G": "*fp32", "D": "*bf16",
                             "PART": "*fp32", "N": "i32", "V": "constexpr", "stride_l": "constexpr",
                             "stride_d": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
                             "COLUMN_PROGRAMS": "constexpr", "STAGES": "constexpr"},
                            {"V": 159_752, "stride_l": 159_752, "stride_d": 159_752}),
}


@pytest.mark.parametrize("name", sorted(_SIGNATURES))
def test_kernels_compile_for_hopper(name):
    """The interpreter does not run Triton's compiler: build both kernels, with the tiles a GPU
    launches, down to an sm_90 binary (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tuner import ce_kernel

    signature, constexprs = _SIGNATURES[name]
    # the launch settings a GPU uses (ce_kernel.FORWARD / BACKWARD)
    settings = dict(ce_kernel.FORWARD if name == "_ce_forward_kernel" else ce_kernel.BACKWARD)
    warps = settings.pop("num_warps")
    constexprs = {**constexprs, **settings}
    # pointers 16-byte aligned, as the launcher specialises them for PyTorch's allocations
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    compiled = triton.compile(ASTSource(getattr(ce_kernel, name), signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]
    # the logits are read 16 bytes at a time (8 bf16), which needs the width and row stride known
    # at compile time: as runtime arguments Triton loaded them two bytes at a time. With STAGES > 1
    # the loop's loads are asynchronous copies to shared memory, also 16 bytes each
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4.b32" in ptx or re.search(r"cp\.async\.cg\.shared\.global [^;]*, 0x10,", ptx), name
