#!/usr/bin/env bash
# One GPU session: install, run the GPU tests, run the benchmark suites; everything lands in $OUT (or ./gpu_out).
#   bash benchmarks/run_gpu.sh [tests] [suite ...]      suites: gemm attention decode gemm_int4 gemm_fp8 llama
# Results JSON go to benchmarks/results/ and are copied, with the logs, into one tarball under $OUT.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > "$OUT/logs/install.log" 2>&1 || { cat "$OUT/logs/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/logs/env.log"
status=0
for what in "$@"; do
  start=$(date +%s)
  if [ "$what" = tests ]; then
    timeout 420 pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -n 60 > "$OUT/logs/gpu_tests.log"; rc=${PIPESTATUS[0]}
    tail -n 25 "$OUT/logs/gpu_tests.log"
  else
    timeout 400 python "examples/bench_${what}.py" > "$OUT/logs/bench_${what}.log" 2>&1; rc=$?
    tail -n 40 "$OUT/logs/bench_${what}.log"
  fi
  echo "== $what: rc=$rc in $(( $(date +%s) - start )) s"
  [ "$rc" -ne 0 ] && status=1
done
cp benchmarks/results/*.json "$OUT/logs/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
exit $status
