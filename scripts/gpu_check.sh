#!/usr/bin/env bash
# One device call: GPU test suite + kernel benchmark, logs under $OUT.
#   bash scripts/gpu_check.sh [tests|tests+launch|launch|files+launch+hf FILES|hf+launch+readme|bench|gqa|tokens|ab|tokens+ab|probe|mods|mods+tests|mods+ab|decode-tests|hf|
#                              decode|tests+decode|cp|tests+cp|gen-host|all]
#                             [extra pytest args...]
# ("all" took about 6 minutes on an H200: it fits one 10-minute device call)
# Runs from the working tree (no install); the device image has torch and triton.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/baracuda_out}"
mkdir -p "$OUT"
stage="${1:-all}"
shift || true

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
if [[ "$stage" == tests || "$stage" == tests+probe || "$stage" == tests+launch || "$stage" == tests+gqa || "$stage" == tests+decode || "$stage" == tests+cp || "$stage" == all ]]; then
  # Triton compiles on the host CPU: several workers keep the card busy while others compile.
  python3 -m pytest tests -q -n 8 -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests.log" 2>&1
  status=$?
  tail -n 25 "$OUT/gpu_tests.log"
fi
if [[ "$stage" == files+launch+hf ]]; then
  # The test files given as extra arguments, then the launch probe and the transformers bench.
  python3 -m pytest -q -n 8 -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests_files.log" 2>&1
  status=$?
  tail -n 15 "$OUT/gpu_tests_files.log"
fi
if [[ "$stage" == launch || "$stage" == tests+launch || "$stage" == files+launch+hf || "$stage" == hf+launch+readme ]]; then
  # Host time per launch (pointer vs TMA arguments), then a cProfile of the host time of a
  # forward launch and of a decode step.
  python3 scripts/probe_launch_cost.py > "$OUT/probe_launch_cost.log" 2>&1 || status=$?
  cat "$OUT/probe_launch_cost.log"
fi
if [[ "$stage" == probe || "$stage" == tests+probe || "$stage" == all ]]; then
  # Host overhead: list building vs forward GPU time, eager vs CUDA-graph step, launches.
  python3 scripts/probe_host_overhead.py > "$OUT/probe_host_overhead.log" 2>&1 || status=$?
  cat "$OUT/probe_host_overhead.log"
  # Kernel tiles at low density (GPU time) and the host breakdown of an eager step.
  python3 scripts/probe_low_density.py > "$OUT/probe_low_density.log" 2>&1 || status=$?
  grep -v "^ \{5,\}[0-9]" "$OUT/probe_low_density.log" | head -80
fi
if [[ "$stage" == bench || "$stage" == all ]]; then
  mkdir -p "$OUT/bench"
  python3 -m baracuda_kernels bench --preset kernels --out "$OUT/bench" 2> "$OUT/bench/progress.log" > "$OUT/bench.log" || status=$?
  tail -n 40 "$OUT/bench.log"
  # The device returns at most 8 files: ship the results folder as one archive.
  tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi
if [[ "$stage" == probe-gqa || "$stage" == tests+gqa ]]; then
  # Pack-GQA tiles vs the plain launch (short queries), GQA vs expanded K/V.
  python3 scripts/probe_gqa.py > "$OUT/probe_gqa.log" 2>&1 || status=$?
  cat "$OUT/probe_gqa.log"
fi
if [[ "$stage" == gqa || "$stage" == all ]]; then
  # Grouped-query attention (H=32, Hkv=8): ours vs ours on expanded K/V, Flex and SDPA
  # with enable_gqa, peak memory per row. The progress log goes into the archive.
  mkdir -p "$OUT/gqa"
  python3 -m baracuda_kernels bench --preset gqa --out "$OUT/gqa" 2> "$OUT/gqa/progress.log" > "$OUT/bench_gqa.log" || status=$?
  tail -n 60 "$OUT/bench_gqa.log"
  tar czf "$OUT/gqa.tgz" -C "$OUT" gqa && rm -rf "$OUT/gqa"
fi
if [[ "$stage" == tokens+ab || "$stage" == tokens ]]; then
  # Token rules (exact window + sinks vs coarsened, documents, varlen; the window at 64k):
  # ours vs Flex given the same rule. The progress log goes into the archive.
  mkdir -p "$OUT/tokens"
  python3 -m baracuda_kernels bench --preset tokens --out "$OUT/tokens" 2> "$OUT/tokens/progress.log" > "$OUT/bench_tokens.log" || status=$?
  tail -n 40 "$OUT/bench_tokens.log"
  tar czf "$OUT/tokens.tgz" -C "$OUT" tokens && rm -rf "$OUT/tokens"
fi
if [[ "$stage" == mods || "$stage" == mods+tests || "$stage" == mods+ab ]]; then
  # Score modifiers (softcap, ALiBi, sinks) vs FlexAttention with the same score_mod.
  python3 scripts/probe_score_mods.py > "$OUT/probe_score_mods.log" 2>&1 || status=$?
  cat "$OUT/probe_score_mods.log"
fi
if [[ "$stage" == mods+tests ]]; then
  python3 -m pytest tests -q -n 8 -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests.log" 2>&1
  status=$?
  tail -n 25 "$OUT/gpu_tests.log"
fi
if [[ "$stage" == probe-tokens || "$stage" == probe-tokens+ab ]]; then
  # Document ids: ids vs coarsened blocks, short-row vs default tiles, varlen; the window.
  python3 scripts/probe_tokens.py > "$OUT/probe_tokens.log" 2>&1 || status=$?
  cat "$OUT/probe_tokens.log"
  python3 scripts/probe_window.py > "$OUT/probe_window.log" 2>&1 || status=$?
  cat "$OUT/probe_window.log"
fi
if [[ "$stage" == ab || "$stage" == tokens+ab || "$stage" == probe-tokens+ab || "$stage" == mods+ab ]]; then
  # Kernel A/B in one run: this tree against an older copy in .ab_old/ (when present, e.g.
  # `git worktree`-free: git archive REV src | tar x -C .ab_old), ours only, patterns whose
  # meaning did not change. .ab_old/ is git-ignored: give it to the device call in `carry`.
  ab="--preset quick --impls ours --patterns dense,causal,random25,random10 --modes fwd,bwd,step --no-check"
  python3 -m baracuda_kernels bench $ab --out "$OUT/ab_new" > "$OUT/ab_new.log" 2>&1 || status=$?
  if [[ -d .ab_old/src ]]; then
    PYTHONPATH="$PWD/.ab_old/src" python3 -m baracuda_kernels bench $ab --out "$OUT/ab_old" > "$OUT/ab_old.log" 2>&1 || status=$?
    PYTHONPATH="$PWD/.ab_old/src" python3 -m baracuda_kernels bench $ab --out "$OUT/ab_old2" > "$OUT/ab_old2.log" 2>&1 || status=$?
    python3 -m baracuda_kernels bench $ab --out "$OUT/ab_new2" > "$OUT/ab_new2.log" 2>&1 || status=$?
  fi
  for f in ab_new ab_old ab_old2 ab_new2; do
    [[ -f "$OUT/$f.log" ]] && { echo "== $f"; grep -E "^(dense|causal|random| {20,})" "$OUT/$f.log" | head -30; }
  done
  rm -rf "$OUT"/ab_new "$OUT"/ab_old "$OUT"/ab_old2 "$OUT"/ab_new2
fi
if [[ "$stage" == hf || "$stage" == files+launch+hf || "$stage" == hf+launch+readme ]]; then
  # The transformers drop-in: training tokens/s (8k, 32k; causal and a 4k window) and decode
  # tokens/s after a 32k prompt, baracuda vs sdpa vs flex_attention (a Llama-like model).
  python3 scripts/bench_transformers.py > "$OUT/bench_transformers.log" 2>&1 || status=$?
  grep -v Warning "$OUT/bench_transformers.log" | tail -n 20
fi
if [[ "$stage" == hf+launch+readme ]]; then
  # Every README python block as written (the CUDA-graph block needs a GPU).
  python3 scripts/check_readme.py > "$OUT/check_readme.log" 2>&1 || status=$?
  cat "$OUT/check_readme.log"
fi
if [[ "$stage" == decode-tests ]]; then
  # The KV-cache / decode test files alone, then the decode probe with its config sweep.
  python3 -m pytest tests/test_kvcache.py tests/test_decode_plan.py tests/test_split_kv.py \
    tests/test_key_selection.py -q -n 8 -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests_decode.log" 2>&1
  status=$?
  tail -n 15 "$OUT/gpu_tests_decode.log"
fi
if [[ "$stage" == decode || "$stage" == tests+decode || "$stage" == decode-tests ]]; then
  # Decode against a KV cache (contiguous, paged, 10% selected) vs SDPA, Flex and the
  # bandwidth floor; the decode-tests stage also sweeps the kernel's tile configs.
  sweep=""; [[ "$stage" == decode-tests ]] && sweep="--sweep"
  python3 scripts/probe_decode.py $sweep > "$OUT/probe_decode.log" 2>&1 || status=$?
  cat "$OUT/probe_decode.log"
fi
if [[ "$stage" == cp || "$stage" == tests+cp ]]; then
  # Context parallelism (issue 17): its tests (gloo processes, the threaded group on the
  # GPU, NCCL with one rank), then weak scaling over the GPUs of this host (2, 4, 8 when
  # there are that many; NVLink multicast stays as the image sets it).
  if [[ "$stage" == cp ]]; then  # (tests+cp ran them with the whole suite)
    python3 -m pytest tests/test_context_parallel.py tests/test_context_parallel_threads.py \
      -q -n 4 -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests_cp.log" 2>&1 || status=$?
    tail -n 15 "$OUT/gpu_tests_cp.log"
  fi
  python3 scripts/bench_context_parallel.py > "$OUT/bench_cp.log" 2>&1 || status=$?
  cat "$OUT/bench_cp.log"
fi
if [[ "$stage" == gen-host ]]; then
  # Host time of a generate() decode step: baracuda vs sdpa (ms per token, host syncs per
  # token with their call sites, cProfile).
  PYTHONPATH="$PYTHONPATH:$PWD/scripts" python3 scripts/probe_generate_host.py \
    > "$OUT/probe_generate_host.log" 2>&1 || status=$?
  cat "$OUT/probe_generate_host.log"
fi
exit $status
