#!/usr/bin/env bash
# The exact commands behind docs/benchmarks.md (CPU). Run from the repository root:
#   bash benchmarks/cpu_figures.sh [OUT_DIR]
# Each line writes one JSON file; docs/benchmarks.md quotes their figures.
set -euo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
B="python -m upernet_ref.cli bench"
# 1. The published ADE20K model at its crop size: eager vs fast, inference and training.
$B --config upernet_r50_os8_ade20k --size 512x512 --mode infer --fast --warmup 1 --repeats 3 --json "$OUT/r50_os8_512_infer.json"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode train --fast --warmup 1 --repeats 2 --json "$OUT/r50_os8_512_train.json"
# 2. The fast path's alternatives, to justify the --fast rules (fp32 folded; torch.compile,
#    measured on the small config because compiling ResNet-50 on 2 cores takes minutes).
$B --config upernet_r50_os8_ade20k --size 512x512 --mode infer --fast --dtype float32 --warmup 1 --repeats 3 --json "$OUT/r50_os8_512_infer_fold_fp32.json"
$B --config upernet_small_demo --size 512x512 --mode infer --fast --compile on --warmup 1 --repeats 5 --json "$OUT/demo_512_infer_compile.json"
# 3. Cost vs image size (latency measured on the small demo config; GMACs for all sizes).
for s in 256 512 1024 2048; do
  $B --config upernet_small_demo --size ${s}x${s} --mode infer --fast --warmup 1 --repeats 5 --json "$OUT/demo_${s}_infer.json"
done
$B --config upernet_r50_os8_ade20k --size 256x256 --mode infer --fast --warmup 1 --repeats 3 --json "$OUT/r50_os8_256_infer.json"
$B --config upernet_r50_os8_ade20k --size 1024x1024 --mode infer --fast --warmup 1 --repeats 2 --json "$OUT/r50_os8_1024_infer.json"
# 4. Batch size.
for b in 1 2 4 8; do
  $B --config upernet_small_demo --size 512x512 --batch $b --mode infer --fast --warmup 1 --repeats 5 --json "$OUT/demo_512_b${b}_infer.json"
done
# 5. Issue 21 (Zen 5 VM): compiled --fast, int8 with its demo-checkpoint accuracy, the training step.
mkdir -p "$OUT/zen5"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode infer --fast --int8 --warmup 1 --repeats 3 --json "$OUT/zen5/r50_os8_512_infer_int8.json"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode infer --fast --warmup 1 --repeats 3 --json "$OUT/zen5/r50_os8_512_infer_rerun.json"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode train --fast --warmup 1 --repeats 2 --json "$OUT/zen5/r50_os8_512_train.json"
python benchmarks/cpu_compile_options.py infer > "$OUT/zen5/compile_options_infer.log"
python benchmarks/cpu_compile_options.py train > "$OUT/zen5/compile_options_train.log"
# 6. Issue 21 item 2 (a Zen 4 VM, family 25 model 17): train --fast with the float32 logits and
#    channels_last conv inputs, and each choice's share (fast_train_options.py).
mkdir -p "$OUT/zen4"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode train --fast --warmup 1 --repeats 3 --json "$OUT/zen4/r50_os8_512_train.json"
python benchmarks/fast_train_options.py 512 3 > "$OUT/zen4/fast_train_options.log"
# 7. Issue 21, late upsampling (the same Zen 4 VM, idle): the CPU fast paths as they are now.
$B --config upernet_r50_os8_ade20k --size 512x512 --mode infer --fast --int8 --warmup 1 --repeats 3 --json "$OUT/zen4/r50_os8_512_infer_late.json"
$B --config upernet_r50_os8_ade20k --size 512x512 --mode train --fast --warmup 1 --repeats 3 --json "$OUT/zen4/r50_os8_512_train_late.json"
