#!/usr/bin/env bash
# One GPU session: install, run the GPU tests, run the benchmark suites; everything lands in $OUT (or ./gpu_out).
#   bash benchmarks/run_gpu.sh [tests[:pytest args]][@secs] [pytest:files[,args]][@secs] [suite[:--flag,value]][@secs] ...
#   tests runs `pytest -m gpu` (the gpu-marked tests only); pytest runs every test of what it is given, on the GPU
#   (unmarked tests too: they run the Triton kernels there instead of the interpreter).
#   suites: gemm attention decode gemm_int4 gemm_fp8 llama; commas in the args become spaces (and in tests
#   args '~' a space inside one argument: tests:-k,not~llama_shapes); @secs is that step's timeout (default
#   $STEP_TIMEOUT, 150 s). Example:
#   bash benchmarks/run_gpu.sh tests:tests/kernels@240 decode:--no-sweep@120 llama:--quick,--cold-compile-caches@420
# Results JSON go to benchmarks/results/ and are copied, with the logs, into one tarball under $OUT.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
# Test-only packages the GPU image may lack travel as wheels in .whl/ (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Install with the interpreter that runs the code (a bare `pip` there can belong to another Python).
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/logs/install.log" 2>&1
if ! (cd /tmp && python -c "import kernopt.kernels, kernopt.passes") >> "$OUT/logs/install.log" 2>&1; then
  # No pip for this interpreter: lay the package out as installed (kernels/, passes/ inside kernopt/).
  shim=/tmp/kernopt-shim/kernopt; rm -rf /tmp/kernopt-shim; mkdir -p "$shim"
  for f in "$PWD"/kernopt/*; do ln -s "$f" "$shim/"; done
  ln -s "$PWD/kernels" "$shim/kernels"; ln -s "$PWD/passes" "$shim/passes"
  export PYTHONPATH=/tmp/kernopt-shim${PYTHONPATH:+:$PYTHONPATH}
  echo "editable install not importable; using $shim" | tee -a "$OUT/logs/install.log"
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/logs/env.log"
status=0
n=0
for arg in "$@"; do
  n=$((n + 1)); start=$(date +%s)
  what=${arg%@*}; limit=$STEP_TIMEOUT
  [ "$what" != "$arg" ] && limit=${arg##*@}
  step=${what%%:*}; extra=""
  [ "$step" != "$what" ] && extra=${what#*:} && extra=${extra//,/ }   # gemm:--rep,50 -> --rep 50
  if [ "$step" = tests ] || [ "$step" = pytest ]; then
    log="$OUT/logs/gpu_tests_$n.log"
    args=()
    [ "$step" = tests ] && args+=(-m gpu)
    for a in $extra; do args+=("${a//\~/ }"); done   # '~' is a space inside one argument: -k,not~slow
    timeout "$limit" pytest -q -p no:cacheprovider "${args[@]}" 2>&1 | tail -n 80 > "$log"; rc=${PIPESTATUS[0]}
    tail -n 25 "$log"
  else
    log="$OUT/logs/bench_${step}_$n.log"
    timeout "$limit" python "examples/bench_${step}.py" $extra > "$log" 2>&1; rc=$?
    tail -n 30 "$log"
  fi
  echo "== $arg: rc=$rc in $(( $(date +%s) - start )) s (limit $limit)"
  [ "$rc" -ne 0 ] && status=1
done
cp benchmarks/results/*.json benchmarks/results/*.png "$OUT/logs/" 2>/dev/null
[ -d benchmarks/results/sweeps ] && cp -r benchmarks/results/sweeps "$OUT/logs/"
tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
exit $status
