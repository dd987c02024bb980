#!/usr/bin/env bash
# The FP8 path's GPU measurements, in parts of under ten minutes each (a part cuts the steps that would run past
# SUITE_SECONDS, 570 by default); every part has its own bf16 rows, so its ratios are measured side by side.
# Results go to $OUT (JSON lines + tables). torchao's float8 row-wise (the peer) is
# `bench_e2e.py --config torchao-fp8-row`, left out here: its compile took 337 s on an H100.
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh kernels   # GPU tests, samples vs reference, batch-64 forward, GEMM table
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh tests     # the kernel tests on the GPU (they compile every variant)
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh models    # every FP8-path model at batch 64 + sampling
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh fold      # SVDQuant r32 with its smoothing folded or kept at run time
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh pass      # the fusion pass on GPU (wheels in .whl/); batch 64; samples
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh gluon     # the Gluon W4A8 GEMM checked and timed; fp8-gluon's tests
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh flux      # FLUX-size via diffusers beside torchao (wheels in .whl/)
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh sd3       # the same at SD3-medium's size (pixart: PixArt-Σ's)
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh flux-graphs  # the same, steps as CUDA graphs (also sd3-, pixart-graphs)
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh launches  # SD3/PixArt: block by block vs whole graph, batch 1 and 4
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh flux-4bit # FLUX-size with the weights 4-bit resident (fp8-gluon, fp8)
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh prepass   # the pre-pass against inductor, its launch sweep
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh small     # batch 2 under CUDA graphs; samples; few-row GEMMs
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh gemms     # GEMMs alone: W4A8 variants, SVDQuant's extra K columns
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh profile   # low-rank kernel launch sweep; kernel profiles
#   PYTHONPATH=$PWD bash bench/run_fp8_suite.sh profile-small  # kernel profiles at batch 2
#   (bench_kernels.py, in the first part, also times the lowbit kernel's launch configs)
set -u
out=${OUT:?set OUT to the results folder}
e2e() { timeout "$(left)" python bench/bench_e2e.py "$@" >>"$out/e2e_$part.jsonl" 2>>"$out/log_$part.txt" || echo "failed: $*" >>"$out/log_$part.txt"; }
PARTS="kernels tests models fold pass gluon flux sd3 pixart flux-graphs sd3-graphs pixart-graphs launches flux-4bit prepass small gemms profile profile-small"
part=${1:?name a part: $PARTS}
deadline=$(( $(date +%s) + ${SUITE_SECONDS:-570} ))  # steps that would run past it are cut
left() { echo $(( deadline - $(date +%s) > 1 ? deadline - $(date +%s) : 1 )); }
wheels() {  # diffusers, importlib_metadata, zipp and torchao, carried as wheels in .whl/ (no network there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
}
case $part in
  kernels)
    python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8.py tests/kernels/test_lowbit.py >"$out/gpu_tests.txt" 2>&1
    tail -3 "$out/gpu_tests.txt"
    python bench/samples_match.py --out "$out/samples_match.json" >>"$out/log_$part.txt" 2>&1
    e2e --batch 64 --config bf16
    e2e --batch 64 --config w4a8fp8 --backend fp8
    e2e --batch 64 --config w4a8fp8 --backend fp8-cached
    python bench/bench_kernels.py --out "$out/kernels_fp8" >>"$out/log_$part.txt" 2>&1 ;;
  tests)  # the kernel tests compile every variant: minutes on an H200, so a part of their own
    nvidia-smi -L
    timeout "$(left)" python -m pytest -q -p no:cacheprovider tests/kernels \
      --ignore=tests/kernels/test_hopper_compile.py >"$out/gpu_tests.txt" 2>&1  # that one compiles for sm_90 anywhere
    tail -3 "$out/gpu_tests.txt"
    exit 0 ;;
  models)  # every FP8-path model against bf16 at batch 64, with 50-step sampling; no CUDA graphs (they gave W4A8
           # nothing at this batch: 1.29× without, 1.26× with, e2e_fp8_v8_graphs_h200.md)
    nvidia-smi -L
    e2e --batch 64 --sample-steps 50 --config bf16
    e2e --batch 64 --sample-steps 50 --config svdquant-w4a8fp8-r32 --backend fp8-cached
    e2e --batch 64 --sample-steps 50 --config w4a8fp8 --backend fp8-cached
    e2e --batch 64 --sample-steps 50 --config w4a8fp8 --backend fp8-cached --fast-accum on
    e2e --batch 64 --sample-steps 50 --config ternary-a8fp8 --backend fp8-cached --all-linears
    e2e --batch 64 --sample-steps 50 --config w4a8fp8 --backend fp8 ;;  # weights 4-bit in memory, expanded per call
  fold)  # SVDQuant r32 with its smoothing folded into the producers of the layers' inputs, and kept at run time
    nvidia-smi -L
    e2e --batch 64 --sample-steps 50 --config bf16
    e2e --batch 64 --sample-steps 50 --config svdquant-w4a8fp8-r32 --backend fp8-cached
    e2e --batch 64 --sample-steps 50 --config svdquant-w4a8fp8-r32 --backend fp8-cached --no-fold ;;
  pass)  # the fusion pass on a GPU (counts, errors; the tiny FLUX needs diffusers from .whl/), every FP8-path model
          # at batch 64 (forward only: a compile each, ~1 min), then samples through the kernels against the reference
    nvidia-smi -L
    wheels
    timeout "$(left)" python bench/check_fusion_gpu.py >"$out/fusion.txt" 2>&1; tail -20 "$out/fusion.txt"
    e2e --batch 64 --config bf16
    e2e --batch 64 --config w4a8fp8 --backend fp8-cached
    e2e --batch 64 --config svdquant-w4a8fp8-r32 --backend fp8-cached
    e2e --batch 64 --config ternary-a8fp8 --backend fp8-cached --all-linears
    e2e --batch 64 --config w4a8fp8 --backend fp8
    e2e --batch 64 --config w4a8fp8 --backend fp8-gluon
    timeout "$(left)" python bench/samples_match.py --out "$out/samples_match.json" >>"$out/log_$part.txt" 2>&1 ;;
  gluon)  # the Gluon W4A8-FP8 GEMM: bit-exact checks, then timed against cuBLAS FP8 and bf16
    nvidia-smi -L
    timeout "$(left)" python bench/bench_gluon_w4a8.py --out "$out/gluon_w4a8" >"$out/log_$part.txt" 2>&1
    tail -5 "$out/log_$part.txt"
    timeout "$(left)" python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_hopper.py >"$out/gpu_tests.txt" 2>&1
    tail -3 "$out/gpu_tests.txt"  # the fp8-gluon backend on the real kernel
    exit 0 ;;
  flux|sd3|pixart)  # a diffusers transformer at its published size: bf16, fp8-cached, fp8-cached with q, k and v
         # as three GEMMs (what joining them gives), torchao float8 row-wise (its compile: ~3.5–6 min on an H100),
         # each row profiled. diffusers, importlib_metadata, zipp and torchao come as wheels in .whl/
    nvidia-smi -L
    wheels
    timeout "$(left)" python bench/bench_diffusers.py --models "$part" --batches 1 --profile --out "$out/diffusers_$part" \
      --configs bf16,w4a8-fp8@fp8-cached,w4a8-fp8@fp8-cached+unjoined,torchao-fp8-row >"$out/log_$part.txt" 2>&1
    tail -7 "$out/diffusers_$part.md"
    exit 0 ;;
  flux-graphs|sd3-graphs|pixart-graphs)  # the model's bf16, fp8-cached and torchao rows, each compiled step captured
    # as one CUDA graph (no host time per launch: what each row's GPU time alone gives; SD3 and PixArt at batch 1
    # are bound by the host otherwise)
    nvidia-smi -L
    wheels
    timeout "$(left)" python bench/bench_diffusers.py --models "${part%-graphs}" --batches 1 --cuda-graphs \
      --configs bf16,w4a8-fp8@fp8-cached,torchao-fp8-row --out "$out/diffusers_$part" >"$out/log_$part.txt" 2>&1
    tail -6 "$out/diffusers_$part.md"
    exit 0 ;;
  launches)  # SD3- and PixArt-size (host-bound at batch 1), batch 1 and 4: block by block, then with Dynamo's guards
             # skipped (what they cost the host), then the whole transformer as one graph (one guard check a step;
             # the text tokens every block reads can be quantized once)
    nvidia-smi -L
    wheels
    for variant in "" --skip-guards --whole-graph; do
      timeout "$(left)" python bench/bench_diffusers.py --models pixart,sd3 --batches 1,4 $variant \
        --configs bf16,w4a8-fp8@fp8-cached --out "$out/diffusers_launches" >>"$out/log_$part.txt" 2>&1
    done
    tail -12 "$out/diffusers_launches.md"
    exit 0 ;;
  flux-4bit)  # FLUX-size with the weights 4-bit in GPU memory: fp8-gluon (Hopper) and fp8 beside bf16, profiled
    nvidia-smi -L
    wheels
    timeout "$(left)" python bench/bench_diffusers.py --models flux --batches 1 \
      --configs bf16,w4a8-fp8@fp8-gluon,w4a8-fp8@fp8 --profile --out "$out/diffusers_flux_4bit" >"$out/log_$part.txt" 2>&1
    tail -6 "$out/diffusers_flux_4bit.md"
    exit 0 ;;
  prepass)  # the pre-pass at DiT-XL/2's batch-64 inputs and other producers against inductor, its launch sweep
    timeout "$(left)" python bench/bench_prepass.py --out "$out/prepass" >>"$out/log_$part.txt" 2>&1
    exit 0 ;;
  small)  # batch 2 under CUDA graphs, samples vs the reference backend, few-row GEMMs as kernels alone
    e2e --batch 2 --config bf16 --cuda-graphs
    e2e --batch 2 --config w4a8fp8 --backend fp8-cached --cuda-graphs --all-linears
    e2e --batch 2 --config w4a8fp8 --backend fp8 --cuda-graphs --all-linears
    e2e --batch 2 --config ternary-a8fp8 --backend fp8 --cuda-graphs --all-linears
    timeout "$(left)" python bench/samples_match.py --out "$out/samples_match.json" >>"$out/log_$part.txt" 2>&1
    timeout "$(left)" python bench/bench_weight_bound.py --out "$out/weight_bound" >>"$out/log_$part.txt" 2>&1 ;;
  gemms)  # DiT-XL/2's GEMMs as kernels alone: cuBLAS FP8 on the cached copy, expansion, the fused lowbit FP8 mode;
          # then what SVDQuant's 2·rank extra columns of K cost
    nvidia-smi -L
    timeout "$(left)" python bench/bench_w4a8_gemm.py --out "$out/w4a8_gemm" >>"$out/log_$part.txt" 2>&1
    timeout "$(left)" python bench/bench_lowrank_gemm.py --out "$out/lowrank_gemm" >>"$out/log_$part.txt" 2>&1
    exit 0 ;;
  profile)  # where batch 64 spends its time: per-kernel GPU tables (SVDQuant's with the host's operators too)
    nvidia-smi -L
    timeout 90 python bench/bench_lowrank_gemm.py --sweep --out "$out/lowrank_sweep" >>"$out/log_$part.txt" 2>&1
    timeout "$(left)" python bench/profile_e2e.py --cpu --configs svdquant-w4a8fp8-r32:fp8-cached,w4a8fp8:fp8-cached \
      --out "$out" >>"$out/log_$part.txt" 2>&1
    exit 0 ;;
  profile-small)  # where batch 2 spends its time: bf16 against W4A8 with the adaLN Linears quantized
    nvidia-smi -L
    timeout "$(left)" python bench/profile_e2e.py --batch 2 --all-linears --configs bf16,w4a8fp8:fp8-cached,w4a8fp8:fp8 \
      --out "$out" >>"$out/log_$part.txt" 2>&1
    exit 0 ;;
  *) echo "unknown part $part: one of $PARTS" >&2; exit 2 ;;
esac
python bench/e2e_table.py "$out/e2e_$part.jsonl" "$out/e2e_$part" && rm "$out/e2e_$part.jsonl"
