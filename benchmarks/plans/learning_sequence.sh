#!/usr/bin/env bash
# Issue 29's held-out sequence on the GPU machine (not run yet): 11 configs with MLX's
# defaults on one host, 7 of them mixture-of-experts models of 7 families, each probed by the
# plugin learning as it goes and then run again at its learned go threshold with the rest of
# the GPU held by another process (benchmarks/learning_sequence.py). Run from the repository
# root with MLX's CUDA backend importable (PYTHONPATH, ../shared/device/README.md), in calls
# of at most 10 minutes while the machine stays warm: each call starts no attempt after
# STOP_AFTER (420) seconds and the next goes on where it stopped.
#
#     WORK=/root/work/sequence bash benchmarks/plans/learning_sequence.sh
#
# The state (the results so far and the pytest cache, which holds the machine's record) is
# copied to $OUT/sequence-state after each call; carried back as .sequence-state (a git-ignored
# folder at the root), it lets a later machine go on, with the record of the same device.
# Then, here: python benchmarks/learning_sequence.py report RESULTS
set -u
work=${WORK:-/root/work/sequence}
mkdir -p "$work"
if [ -d .sequence-state ] && [ ! -e "$work/.pytest_cache" ]; then cp -r .sequence-state/. "$work"/; fi
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -dc 'A-Za-z0-9' | tr 'A-Z' 'a-z')
out=$work/${device}-learning-sequence.jsonl
python3 benchmarks/learning_sequence.py benchmarks/plans/learning_sequence_cuda.jsonl \
  --out "$out" --work "$work" --backend cuda --stop-after "${STOP_AFTER:-420}"
rc=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/sequence-state"
  cp -r "$work/.pytest_cache" "$work"/*.jsonl "$OUT/sequence-state/"
fi
python3 benchmarks/learning_sequence.py report "$out"
exit $rc
