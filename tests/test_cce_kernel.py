"""The Triton cut cross-entropy kernels, run by Triton's interpreter on the CPU (no GPU in CI).

`tests/cce_kernel_check.py` runs in its own process, because TRITON_INTERPRET must be set before
the kernels are defined: it checks the custom op in both modes (with the target term, and the
log-sum-exp alone as CCE- uses it), both kernel code paths (hidden size within one K tile, and a
K loop), ignored rows, chunks that do not divide the catalog, and the `cce` / `cce_sampled`
losses dispatching to the op, eagerly and under torch.compile. The GPU figures and the bf16
check on an H100 come from benchmarks/large_catalog.py.
"""

import pytest

pytest.importorskip("triton")

from tests.triton_helpers import interpreted  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return interpreted("cce_kernel_check.py")


@pytest.mark.parametrize("case", ["preload_fp16", "kloop_fp16", "fp32", "widened_fp16"])
def test_kernel_matches_chunked_reference(result, case):
    r = result[case]
    # the log-sum-exp accumulates in fp32 whatever the input dtype
    assert r["rows"] < 1e-6 and r["lse"] < 1e-6 and r["lse_only"] < 1e-6
    assert r["ignored_rows_zero"]
    # gradients come out in the input dtype: fp16 rounding (2^-11) bounds them, fp32 is exact
    bound = 1e-5 if case == "fp32" else 2e-3
    for key in ("grad_hidden", "grad_weight", "grad_bias", "lse_only_grad"):
        assert r[key] < bound, (key, r[key])


@pytest.mark.parametrize("mode", ["loss", "loss_compiled"])
def test_cut_losses_run_on_the_kernel(result, mode):
    r = result[mode]
    for name in ("cce", "cce_sampled"):
        assert r[name + "_ops"] == ["tuner::cut_ce_rows", "tuner::cut_ce_rows_backward"], r[name + "_ops"]
        assert r[name] < 1e-3 and r[name + "_grad"] < 2e-3, (name, r)


# pointer and scalar types of the kernels' runtime arguments, as the CUDA launcher would see them
_SIGNATURES = {
    "_lse_kernel": {"X": "*bf16", "W": "*bf16", "B": "*bf16", "PART": "*fp32", "N": "i32", "V": "i32",
                    "stride_x": "i32", "stride_w": "i32", "ROWS": "i32"},
    "_dlogits_kernel": {"X": "*bf16", "W": "*bf16", "B": "*bf16", "LSE": "*fp32", "GS": "*fp32", "GT": "*fp32",
                        "T": "*i32", "DS": "*bf16", "DB": "*fp32", "N": "i32", "V": "i32", "v0": "i32", "vc": "i32",
                        "stride_x": "i32", "stride_w": "i32", "stride_ds": "i32", "ROWS": "i32"},
}


@pytest.mark.parametrize("hidden", [256, 384])  # one K tile preloaded or K loop, by config
@pytest.mark.parametrize("name", sorted(_SIGNATURES))
def test_every_tuned_config_compiles_for_hopper(name, hidden):
    """The interpreter does not run Triton's compiler: build every autotuning config the kernel
    keeps for this hidden size down to an sm_90 binary, as the H100 would (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tuner import cce_kernel

    kernel = getattr(cce_kernel, name)
    configs = kernel.early_config_prune(kernel.configs, {}, H=hidden)
    assert configs
    signature = {**_SIGNATURES[name], **{k: "constexpr" for k in ("H", "BLOCK_N", "BLOCK_V", "BLOCK_K")}}
    for config in configs:
        compiled = triton.compile(ASTSource(kernel.fn, signature, constexprs={"H": hidden, **config.kwargs}),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        assert compiled.asm["cubin"], (name, config)
