#!/usr/bin/env bash
# One call on a lent GPU machine: CUDA parity tests, then the benchmarks; log and JSON in $OUT.
#
# That machine reaches no registry. It has Python 3.12, torch 2.11, triton 3.6, pytest,
# pytest-benchmark, hypothesis, timm, safetensors, regex, tqdm, huggingface-hub, torchvision; not
# open_clip_torch, ftfy or wcwidth (DA-CLIP needs them). Carry those as wheels: once, here, in the
# repository root (they are pure Python but for wcwidth's abi3 wheel):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#
# then run `M2RESTORE_COMMIT=<hash> bash bench/gpu_check.sh` (the hash of the tree you send: the
# copy there may carry a stale .git) with `.whl` in the call's carry list and a limit of ~600 s
# (the script stops itself after GPU_CHECK_BUDGET_S=570 s). A fresh machine has no Triton cache:
# compiling the kernels' specialisations is most of the parity step and of each first benchmark.
#
# Steps, each under `timeout` (SIGTERM first: pytest then still writes its JSON and XML) and all inside
# the budget, most valuable first so a slow step only costs the ones after it; each benchmark step
# writes its own JSON, so one that runs out of time loses only its own numbers:
#   1. machine facts (GPU, driver, versions, commit);
#   2. expose the project on PYTHONPATH (no pip build), check `import m2restore, m2restore_kernels`
#      before open_clip is there, then install the carried wheels;
#   3. CUDA parity tests: the kernel files' tests marked cuda, then the rest of those files (their
#      sweeps run on CUDA there), then the tests marked cuda elsewhere ->
#      $OUT/tests_kernels_cuda.xml, $OUT/tests_kernels_not_cuda.xml, $OUT/tests_cuda.xml;
#   4. the whole network, bench/gpu_network.py (issue 18): paper() with DA-CLIP, bf16, batch 1, 224²,
#      reference vs ours eager, ours as a CUDA graph, a kernel profile of one forward (top kernels
#      by device time, launch counts), the training step (fwd+bwd, batch 8 of 128² crops) ours vs
#      reference, then torch.compile (+ CUDA graph) -> $OUT/network/network.{json,md} and cases/;
#   4b. benchmarks: yardstick + MoE, scan, gated fusion -> $OUT/bench_{moe,scan,gated_fusion}.json;
#   5. `m2restore bench` on the paper config: reference vs triton, fp32/bf16, eager and CUDA graph
#      (triton only), with DA-CLIP -> $OUT/model.json (a process of its own: a failed capture can
#      leave CUDA unusable);
#   6. bench/profile_model.py: the top CUDA kernels of one bf16 forward (into the log);
#   7. the model group's cost per pixel in bf16 (224/512/1024) -> $OUT/bench_model.json. The
#      torch.compile cases (`pytest bench/test_bench_model.py -k compile`) need a call of their own:
#      inductor compiles the whole network first;
#   8. with whatever budget is left, bench/tune.py: alternative launch configurations of the MoE
#      and scan kernels at the 512x512 shapes, timed and checked -> $OUT/tune_{moe,scan}.json.
# `python bench/report.py $OUT/bench_*.json` turns the JSON into the tables of bench/RESULTS.md.
# At most 8 files come back from a lent machine: the last step packs everything into
# $OUT/results.tar.gz beside copies of the log and network.md.
# The exit status is the number of steps that failed (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"
DEADLINE=$(( $(date +%s) + BUDGET_S ))
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
FAILED=0

exec > >(tee -a "$LOG") 2>&1

# step NAME SECONDS CMD...: run CMD under min(SECONDS, time left), log its status and duration.
step() {
  local name=$1 want=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  local limit=$(( want < left ? want : left ))
  echo
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  if (( limit < 10 )); then
    echo "=== $name: SKIPPED, the ${BUDGET_S}s budget is spent"
    FAILED=$(( FAILED + 1 ))
    return
  fi
  local t0=$SECONDS rc=0
  # bash -c so that the shell functions below can run under timeout, which kills the whole group.
  timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" || rc=$?
  local took=$(( SECONDS - t0 ))
  if (( rc == 0 )); then
    echo "=== $name: ok in ${took}s"
  else
    (( rc == 124 || rc == 137 )) && echo "=== $name: TIMED OUT after ${took}s" \
                                 || echo "=== $name: FAILED (exit $rc) in ${took}s"
    FAILED=$(( FAILED + 1 ))
  fi
}

facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0))
EOF
  if [[ -n ${M2RESTORE_COMMIT:-} ]]; then
    echo "commit: $M2RESTORE_COMMIT"
  else
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), read from the copied .git (may be stale)"
  fi
}

install() {
  # Links rather than `pip install -e .` (27 s there): the two import names, straight from the tree.
  mkdir -p /tmp/m2path
  ln -sfn "$PWD/m2restore" /tmp/m2path/m2restore
  ln -sfn "$PWD/kernels/m2restore_kernels" /tmp/m2path/m2restore_kernels
  "$PY" -c "import m2restore, m2restore_kernels, m2restore.benchmark; print('import ok without open_clip')"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/ carried: DA-CLIP cases will be skipped or fail"
  fi
  "$PY" -c "import open_clip; print('open_clip', open_clip.__version__)"
}

export PYTHONPATH="/tmp/site:/tmp/m2path:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Every kernel's whole test file (its CPU and CUDA cases), then the tests marked cuda elsewhere.
parity() {
  local files=() ignore=() f op rc=0
  for op in kernels/m2restore_kernels/*/__init__.py; do  # one package per op
    op=$(basename "$(dirname "$op")")
    for f in tests/test_"$op"*.py; do [[ -e $f ]] && files+=("$f") && ignore+=("--ignore=$f"); done
  done
  echo "kernel test files: ${files[*]:-none}"
  if (( ${#files[@]} )); then
    # Compiling the many specialisations is CPU-bound: spread it over workers where xdist is there.
    local workers=() picked
    "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
    # The kernel files' own CUDA tests first (the GPU-sized parity cases, both forms of the scan's
    # reverse scan): if the time runs out in the sweeps after them, these answers are already in.
    for picked in cuda "not cuda"; do
      local marked=0
      "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" -m "$picked" \
        --junitxml="$OUT/tests_kernels_${picked// /_}.xml" "${files[@]}" || marked=$?
      (( marked != 0 && marked != 5 )) && rc=1
    done
  fi
  local marked=0
  "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests_cuda.xml" -m cuda tests "${ignore[@]}" || marked=$?
  (( marked == 5 )) && echo "no other tests are marked cuda"  # pytest's 'nothing collected'
  (( marked != 0 && marked != 5 )) && rc=1
  return $rc
}

export PY OUT
export -f facts install parity
BENCH=("$PY" -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,min,max,rounds)
step "machine" 20 facts
step "install" 30 install
step "cuda parity tests" 130 parity
step "whole network" 370 "$PY" bench/gpu_network.py --out "$OUT/network" --budget-s 360
step "moe benchmarks" 110 "${BENCH[@]}" bench/test_bench_yardstick.py bench/test_bench_moe.py \
  --benchmark-json "$OUT/bench_moe.json"
step "scan benchmarks" 60 "${BENCH[@]}" bench/test_bench_scan.py --benchmark-json "$OUT/bench_scan.json"
step "gated fusion benchmarks" 60 "${BENCH[@]}" bench/test_bench_gated_fusion.py \
  --benchmark-json "$OUT/bench_gated_fusion.json"
step "m2restore bench" 80 "$PY" -m m2restore bench --config paper --size 224 --backends reference,triton \
  --dtypes fp32,bf16 --graph --rounds 10 --warmup 2 --json "$OUT/model.json"
step "profile" 40 "$PY" bench/profile_model.py --backend triton --dtype bf16 --size 224
step "model scaling benchmarks" 60 "${BENCH[@]}" bench/test_bench_model.py -k "scaling and bf16" \
  --benchmark-json "$OUT/bench_model.json"
step "tune moe" 90 "$PY" bench/tune.py moe --json "$OUT/tune_moe.json"
step "tune scan" 90 "$PY" bench/tune.py scan --json "$OUT/tune_scan.json"

echo
echo "=== gpu_check done: $FAILED step(s) failed; files in $OUT:"
ls -laR "$OUT"
# Everything in one archive (the lent machine returns at most 8 files), the two summaries beside it.
if tar czf /tmp/results.tar.gz -C "$OUT" . ; then
  find "$OUT" -mindepth 1 -delete
  mv /tmp/results.tar.gz "$OUT/"
  tar xzf "$OUT/results.tar.gz" -C "$OUT" ./network/network.md 2>/dev/null && mv "$OUT/network/network.md" "$OUT/" \
    && rmdir "$OUT/network"
  tar xzf "$OUT/results.tar.gz" -C "$OUT" ./gpu_check.log
fi
exit "$FAILED"
