#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (none of CI's machines has a GPU):
# the test suite on CUDA, bf16 training throughput and MFU of the 1b preset through `anymodal train`,
# decode speed on CUDA, and a shortened `anymodal demo`. Every step has its own time limit, writes its
# output to $OUT and the script goes on when one fails; docs/results.md quotes what they printed.
#
# Expects: python3 with torch (CUDA), the project's other requirements on PYTHONPATH, and optionally
# espeak-ng (the demo world has no speech without it). docs/results.md ("GPU checks") says how the
# requirements and espeak-ng were carried to a machine with no network.
#   OUT=/tmp/checks bash benchmarks/device_checks.sh
set -u
OUT=${OUT:?set OUT to a folder for the logs}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.log, record its exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${SECONDS}s_total $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$OUT/steps.txt" 2>&1
$PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' >>"$OUT/steps.txt" 2>&1
cat "$OUT/steps.txt"

# 1. bf16 training of the 1b preset through the real `anymodal train` (DeepSpeed ZeRO-2, one GPU), and
# what the packed-document attention mask costs a forward + backward of the same model.
step train_1b 100 $PY benchmarks/train_cli_throughput.py --config train/1b_gpu --steps 14 --warmup-steps 4 \
  grad_accum=1 log_every=1 eval_every=1000000
step doc_mask 60 $PY benchmarks/doc_mask_cost.py --preset 1b --batch 4 --seq 4096 --reps 4
# 2. decode speed, ours vs HF Chameleon's generate, bf16 on the GPU (about a minute each).
step decode_demo 70 $PY benchmarks/decode_speed.py --device cuda --dtype bf16 --reps 2 --new 64 --preset demo
step decode_1b 80 $PY benchmarks/decode_speed.py --device cuda --dtype bf16 --reps 2 --new 64 --preset 1b
# 3. the tests and a shortened demo side by side (the demo is mostly CPU work here). On the 2026-12-04
# machine a larger version (4,000 documents, 30 s per tokenizer) stopped at 240 s in prepare; these
# smaller settings have not run there yet.
step tests 280 $PY -m pytest tests -p no:cacheprovider -n 8 -rf &
step demo 280 $PY -m anymodal.cli demo --out "$OUT/demo_run" world.train_docs=3000 world.val_docs=270 \
  'world.extra_sources=[]' 'image_tokenizer_overrides=[train.max_minutes=0.4]' \
  'audio_tokenizer_overrides=[max_minutes=0.4]' \
  'gpu_train_overrides=[model_preset=model/demo,micro_batch=32,max_minutes=0.75]' eval_limit=20
wait
cp "$OUT/demo_run/metrics.json" "$OUT/demo_metrics.json" 2>/dev/null
rm -rf "$OUT/demo_run"  # at most 8 files come back
cat "$OUT/steps.txt"
