#!/bin/bash
# Issue 5's pending GPU runs, most wanted first, in one call of about 9 minutes on one GPU:
#
#   bash benchmarks/gpu_pending.sh OUTDIR SESSION COMMIT CALL [SECONDS]
#
# 1. The CUDA tests of code no GPU has run yet: model.residual=half (the fp16 residual stream)
#    and the step graph's fp16 cases, beside step 2's first process (they share the GPU).
# 2. On an H100 only: 430M against the seed's step, each side in a process of its own, with and
#    without cuBLAS's workspace (process_ab.py, as session 32's H200 run): is 430M over 4x there?
# 3. fp16's step (a V100's dtype, timed on this GPU) with the fp16 residual stream against the
#    fp32 one, and bf16 in the same process, at 130M and 5M (gpu_throughput.py, GPU alone).
# 4. With what is left of SECONDS (default 540): ML-1M seeds of the fp16_stream group, the
#    accuracy check model.residual=half needs before it could become fp16's default.
#
# Every result lands in OUTDIR (gpu.txt names the GPU; SESSION, COMMIT and CALL stamp the ML-1M
# rows, as render_tables.paired_table reads them).
# The ML-1M file is $ML1M (benchmarks/paths.py's default otherwise). On the device machine,
# install Ray, Optuna and MLflow first (../shared/gpu/README.md).
set -u
if [ $# -lt 4 ]; then
  echo "usage: bash benchmarks/gpu_pending.sh OUTDIR SESSION COMMIT CALL [SECONDS]" >&2
  exit 2
fi
out=$1 session=$2 commit=$3 call=$4 budget=${5:-540}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out" || exit 1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
echo "$commit" > "$out/commit.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$out/gpu.txt" 2>&1
gpu=$(tail -1 "$out/gpu.txt")

( timeout 300 python -m pytest -q -rs --durations=5 tests/test_model.py::test_bf16_residual_stream_under_autocast \
    tests/test_model.py::test_half_residual_stream_under_fp16_autocast \
    tests/test_step_graph.py::test_the_step_graph_trains_as_the_step_it_captures \
    tests/test_step_graph.py::test_an_overflowing_fp16_replay_skips_its_update_and_backs_off_the_scale \
    > "$out/cuda_tests.log" 2>&1; echo "exit=$?" >> "$out/cuda_tests.log" ) &

if [[ $gpu == *H100* ]]; then
  timeout 260 python benchmarks/process_ab.py --size 430M --rounds 2 --timeout 120 --out "$out/process_ab" \
    --arm default= --arm noworkspace=CUBLAS_WORKSPACE_CONFIG=:0:0,CUBLASLT_WORKSPACE_SIZE=0 \
    > "$out/process_ab.out" 2>&1
  echo "exit=$?" >> "$out/process_ab.out"
fi
wait  # the tests, so the timings below have the GPU alone

for size in 130M 5M; do
  left=$((budget - SECONDS))
  [ $left -gt 150 ] || break
  timeout $((left < 200 ? left - 30 : 170)) python benchmarks/gpu_throughput.py --sizes $size --steps 30 \
    --seed-variants --variants amp_compile_graphs_fp16 amp_compile_graphs_fp16_half_residual amp_compile_graphs_fp16 \
      amp_compile_graphs_fp16_half_residual amp_compile_graphs \
    --output "$out/gpu_throughput_${size}_half_residual.json" > "$out/gpu_throughput_${size}_half_residual.out" 2>&1
  echo "exit=$?" >> "$out/gpu_throughput_${size}_half_residual.out"
done

left=$((budget - SECONDS))
echo "after the timings: ${SECONDS}s elapsed, ${left}s left" > "$out/ml1m.note"
if [ $left -gt 240 ]; then
  python benchmarks/ml1m_variants.py --group fp16_stream --device cuda --config benchmarks/ml1m.yaml --epochs 200 \
    --set optim.lr=3.716e-3 --set model.dropout=0.222 --set optim.weight_decay=0.0559 \
    --set train.mask_prob=0.342 --set train.window_prob=0.83 --parallel 8 --timeout $((left - 20)) \
    --stamp session="$session" --stamp code_commit="$commit" --stamp device_call="$call" \
    --only fp16_half_stream fp16_fp32_stream fp16_half_stream_seed1 fp16_fp32_stream_seed1 \
      fp16_half_stream_seed2 fp16_fp32_stream_seed2 fp16_half_stream_seed3 fp16_fp32_stream_seed3 \
    --out "$out/fp16_stream_call$call.json" > "$out/fp16_stream_call$call.out" 2>&1
fi
uptime > "$out/uptime.txt"
