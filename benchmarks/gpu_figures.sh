#!/usr/bin/env bash
# The GPU checks and figures behind docs/benchmarks.md ("GPU"). Run from the repository root:
#
#   bash benchmarks/gpu_figures.sh [OUT_DIR [STAGE ...]]
#
# OUT_DIR: default $OUT if set, else benchmarks/results/gpu. STAGES, in this order by default:
#   tests   python -m pytest tests/test_cuda.py                           (expected ~3-4 min)
#   infer   R-50 os8 ADE20K 512x512 inference, eager vs --fast, batch 1 and 16      (~2-3 min)
#   train   R-50 os8 512x512 training step, eager vs --fast, batch 16 (8 too if 16 does not
#           fit)                                                                     (~2-3 min)
#   sweep   R-50 os8 inference at 256, 1024, 2048 (512: from "infer"), batch 1, --fast (~3-4)
#   r101    R-101 os8 ADE20K 512x512 training step, batch 16, eager vs --fast         (~3 min)
#   notebooks  every notebook's code on the GPU (full sizes), benchmarks/run_notebooks.py:
#           runs or fails, no output comparison (not a default stage)                 (~2-4 min)
# (Expectations, none measured yet.) Most of the time is torch.compile's first call: --fast
# compiles on CUDA, once per model and shape. With a 10-minute limit per command, run it as
# two commands (a third if the second ran out of time: the last lines say what to rerun):
#   bash benchmarks/gpu_figures.sh "$OUT" tests infer
#   bash benchmarks/gpu_figures.sh "$OUT" train r101 sweep
# Every step runs under a time limit and the whole run stops starting new steps when its
# budget (GPU_FIGURES_BUDGET_S, default 560 s) is spent; a failed, timed-out or skipped step
# is recorded and the next one runs. Results: one JSON per bench step, test_cuda.xml,
# status.tsv (step, exit code, seconds, state), summary.md (the table for the docs), log.txt.
#
# GPU_FIGURES_DRY_RUN=1 runs the same steps on the CPU with upernet_small_test at sizes / 8
# (64x64 for 512x512) and the fast path uncompiled (--compile off: the CPU's inductor C++
# backend is not the GPU's Triton, and costs ~20 s a shape; tests/test_fast_path.py checks it)
# in about 15 s: a check of this script, not figures.
set -uo pipefail

OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests infer train sweep r101)
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1

BUDGET_S=${GPU_FIGURES_BUDGET_S:-560}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .`
export PYTHONUNBUFFERED=1

if [ "${GPU_FIGURES_DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu R50=upernet_small_test R101=upernet_small_test
  s() { echo $(($1 / 8)); }  # 512 -> 64
  WARM=1 REP=2 WARM_BIG=1 REP_BIG=2 BENCH_EXTRA=(--compile off)
else
  DEVICE=cuda R50=upernet_r50_os8_ade20k R101=upernet_r101_os8_ade20k
  s() { echo "$1"; }
  WARM=3 REP=10 WARM_BIG=2 REP_BIG=5 BENCH_EXTRA=()
fi
S256=$(s 256) S512=$(s 512) S1024=$(s 1024) S2048=$(s 2048)

echo "=== gpu_figures.sh $(date -u +%FT%TZ): stages ${STAGES[*]}; out $OUT_DIR; device $DEVICE;" \
     "budget ${BUDGET_S}s; python $PY"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not available"; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
  2>/dev/null || true
"$PY" - <<'EOF'
import platform, shutil, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}"
      f"  cuDNN {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as err:
    print(f"triton: not importable ({type(err).__name__}): torch.compile cannot run on CUDA")
print("C compiler:", shutil.which("cc") or shutil.which("gcc") or "none (Triton needs one)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {torch.cuda.get_device_name(0)}, capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)")
    from upernet_ref.perf.hardware import device_peak_tflops
    print(f"bf16 peak for MFU: {device_peak_tflops(torch.device('cuda'))} TFLOP/s (hardware.PEAK_TFLOPS)")
else:
    print("CUDA: not available")
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_figures.sh: CUDA is not available here (GPU_FIGURES_DRY_RUN=1 checks the script on CPU)"
  exit 2
fi

FAILED=() SKIPPED_STAGES=() LAST_STATE=
# step STAGE NAME LIMIT_S COMMAND...: run COMMAND under a time limit, record how it went.
step() {
  local stage=$1 name=$2 cap=$3; shift 3
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 45 ]; then
    echo "--- $name: skipped (time budget spent)"
    LAST_STATE=skipped
    printf '%s\t-\t0\tskipped\n' "$name" >> "$OUT_DIR/status.tsv"
    [[ " ${SKIPPED_STAGES[*]} " == *" $stage "* ]] || SKIPPED_STAGES+=("$stage")
    return 1
  fi
  local limit=$((cap < left - 15 ? cap : left - 15)) t0 rc state
  echo "--- $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in 0) state=ok ;; 124|137) state=timeout ;; *) state=failed ;; esac
  LAST_STATE=$state
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$state" >> "$OUT_DIR/status.tsv"
  echo "--- $name: $state (exit $rc, $(($(date +%s) - t0)) s)"
  [ "$state" = ok ] || FAILED+=("$name")
  return $rc
}
bench() {  # bench STAGE NAME LIMIT_S ARGS...: one `upernet bench` writing OUT_DIR/NAME.json
  local stage=$1 name=$2 cap=$3; shift 3
  step "$stage" "$name" "$cap" "$PY" -m upernet_ref.cli bench --device "$DEVICE" "$@" \
    ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} --json "$OUT_DIR/$name.json"
}
out_of_memory() {  # out_of_memory FILE: true if the JSON is missing or records an OOM phase
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); \
sys.exit(0 if any('out of memory' in e for e in r.get('errors', {}).values()) else 1)" "$1" \
    2>/dev/null || [ ! -f "$1" ]
}

for stage in "${STAGES[@]}"; do
  case $stage in
  tests)
    step tests test_cuda 400 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
      --junitxml "$OUT_DIR/test_cuda.xml" ;;
  infer)
    bench infer r50_os8_512_b1_infer 240 --config "$R50" --size "${S512}x${S512}" --batch 1 \
      --mode infer --fast --warmup 5 --repeats 30
    bench infer r50_os8_512_b16_infer 240 --config "$R50" --size "${S512}x${S512}" --batch 16 \
      --mode infer --fast --warmup "$WARM" --repeats "$REP" ;;
  train)
    bench train r50_os8_512_b16_train 300 --config "$R50" --size "${S512}x${S512}" --batch 16 \
      --mode train --fast --warmup "$WARM" --repeats "$REP"
    if [ "$LAST_STATE" != skipped ] && out_of_memory "$OUT_DIR/r50_os8_512_b16_train.json"; then
      bench train r50_os8_512_b8_train 300 --config "$R50" --size "${S512}x${S512}" --batch 8 \
        --mode train --fast --warmup "$WARM" --repeats "$REP"
    fi ;;
  sweep)
    for size in "$S256" "$S1024" "$S2048"; do
      warm=$WARM rep=$REP
      [ "$size" = "$S2048" ] && warm=$WARM_BIG rep=$REP_BIG
      bench sweep "r50_os8_$((size * 512 / S512))_b1_infer" 180 --config "$R50" \
        --size "${size}x${size}" --batch 1 --mode infer --fast --warmup "$warm" --repeats "$rep"
    done ;;
  notebooks)
    step notebooks run_notebooks 400 "$PY" benchmarks/run_notebooks.py ;;
  r101)
    bench r101 r101_os8_512_b16_train 330 --config "$R101" --size "${S512}x${S512}" --batch 16 \
      --mode train --fast --warmup "$WARM_BIG" --repeats "$REP_BIG" ;;
  *)
    echo "gpu_figures.sh: unknown stage $stage (tests, infer, train, sweep, r101, notebooks)"
    FAILED+=("$stage") ;;
  esac
done

# The table for docs/benchmarks.md, from every bench JSON in OUT_DIR.
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.md"
import json, sys
from pathlib import Path

rows = ["| run | config | input | phase | path | ms / batch | images/s | MFU | peak MB |",
        "|---|---|---|---|---|---|---|---|---|"]
gpu = None
for path in sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(path.read_text())
    if "machine" not in r:
        continue
    m = r["machine"]
    gpu = gpu or f"{m.get('gpu', m.get('cpu'))}, torch {m['torch']}, CUDA {m.get('cuda')}"
    fast, errors = r.get("fast", {}), r.get("errors", {})
    eager = "eager fp32" + (" (TF32 convs)" if m.get("tf32_convolutions") else "")
    h, w = r["size"]
    for phase, p, batch in (("infer", "", r["batch"]), ("train", "train_", r.get("train_batch"))):
        if r["mode"] not in (phase, "both"):
            continue
        label = fast.get("settings" if phase == "infer" else "train_settings", "fast")
        for name, figs, err in ((eager, r, errors.get(phase)),
                                (f"fast: {label}", fast, errors.get("fast_" + phase))):
            ms = figs.get("latency_ms" if phase == "infer" else "train_step_ms")
            speed = fast.get("speedup" if phase == "infer" else "train_speedup")
            note = f" ({speed:.2f}x)" if figs is fast and speed else ""
            if ms is None:
                rows.append(f"| {path.stem} | {r['config']} | {batch}x{h}x{w} | {phase} | {name} |"
                            f" {err or 'not measured'} | | | |")
                continue
            mfu = figs.get(p + "mfu")
            mfu = "-" if mfu is None else f"{100 * mfu:.1f}%"
            rows.append(f"| {path.stem} | {r['config']} | {batch}x{h}x{w} | {phase} | {name} | "
                        f"{ms:,.1f} | {figs[p + 'images_per_s']:,.1f}{note} | {mfu} | "
                        f"{figs[p + 'peak_memory_mb']:,.0f} |")
        if fast.get(p + "compile_error"):
            rows.append(f"| {path.stem} | | | {phase} | torch.compile failed, fast path measured "
                        f"uncompiled: {fast[p + 'compile_error']} | | | | |")
print(f"GPU figures: {gpu}\n")
print("\n".join(rows))
EOF

echo "=== steps (name, exit code, seconds, state):"
cat "$OUT_DIR/status.tsv"
echo "=== done in $(($(date +%s) - START)) s; results in $OUT_DIR"
if [ ${#SKIPPED_STAGES[@]} -gt 0 ]; then
  echo "not run for lack of time: rerun with  bash benchmarks/gpu_figures.sh $OUT_DIR ${SKIPPED_STAGES[*]}"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]} (see log.txt)"
  exit 1
fi
[ ${#SKIPPED_STAGES[@]} -eq 0 ]
