#!/usr/bin/env bash
# The real-size grid on the GPU machine, config by config: mlx_lm.lora itself (run), then the
# plugin on the same YAML (compare), so that a call cut short keeps whole pairs. Resumable:
# both subcommands skip the configs their results file holds. Run from the repository root,
# with MLX's CUDA backend and mlx-lm importable (PYTHONPATH) and the results under $WORK:
#
#     WORK=/root/work bash benchmarks/lora_yaml/gpu/run.sh [NAME ...]
#
# Copies both results files to $OUT (the device machine's return folder) after each config.
set -u
grid=benchmarks/lora_yaml/gpu
work=${WORK:-/root/work}
results=$work/results
mkdir -p "$results"
order=(
  dora-llama1b-4bit-adam-equal
  full-llama1b-bf16-adamw-equal
  lora-qwen3-1.7b-4bit-adafactor-qkvo-long
  lora-llama1b-4bit-adam-mixed
  lora-olmoe-4bit-adam-equal
  lora-llama1b-4bit-adamw-mlp-dropout-ckpt-chat
  lora-llama1b-4bit-adam-equal
  lora-llama1b-4bit-adam-cut1023
  lora-llama1b-4bit-adam-cut1024
)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  python3 benchmarks/lora_yaml.py --grid "$grid" run --only "$name" \
    --out "$results/h200-lora-yaml.jsonl" --work "$work" --timeout 300
  python3 benchmarks/lora_yaml.py --grid "$grid" compare --only "$name" \
    --mlx-lm "$results/h200-lora-yaml.jsonl" --out "$results/h200-lora-yaml-plugin.jsonl" \
    --work "$work" --timeout 300
  if [ -n "${OUT:-}" ]; then cp "$results"/*.jsonl "$OUT"/; fi
done
