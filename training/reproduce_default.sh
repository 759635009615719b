#!/usr/bin/env bash
# Reproduce the shipped per-arm default policy on a GPU machine (MuJoCo rendering through EGL):
# demonstrations with images -> imitation training -> closed-loop evaluation of its checkpoints -> best by success.
#
#   WORKERS=16 TRAIN_BUDGET_S=600 bash training/reproduce_default.sh runs/default
#
# Every stage resumes where it stopped (demos from their shards, training from its state), so the script can be
# rerun in chunks on machines that limit one command's time.
set -euo pipefail
OUT=${1:-runs/default}
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-$(nproc)}
EPISODES=${EPISODES:-200}
STEPS=${STEPS:-30000}
BATCH=${BATCH:-128}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-}
STOP_AT=${STOP_AT:-}  # stop training at this step (rerun to continue): for machines that limit one command's time
EVAL_EPISODES=${EVAL_EPISODES:-100}
SAVE_EVERY=${SAVE_EVERY:-2500}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-egl}

echo "== demonstrations: $EPISODES scripted episodes, 3 cameras at 96 px, $WORKERS workers"
$PY training/demos.py --episodes "$EPISODES" --out "$OUT/transport_scripted_96.hdf5" --images --image-size 96 \
    --workers "$WORKERS" --compression lzf --no-progress

echo "== imitation: per-arm small policy"
$PY training/imitation.py --variant per-arm --model small --data "$OUT/transport_scripted_96.hdf5" \
    --out "$OUT/per-arm-small" --steps "$STEPS" --batch-size "$BATCH" --save-every "$SAVE_EVERY" --no-progress \
    ${TRAIN_BUDGET_S:+--time-budget-s "$TRAIN_BUDGET_S"} ${STOP_AT:+--stop-at "$STOP_AT"}
if [[ -n "$STOP_AT" ]] && [[ ! -d "$OUT/per-arm-small/checkpoints/step_$(printf %06d "$STEPS")" ]]; then
    echo "training stopped at step $STOP_AT of $STEPS: rerun with a larger STOP_AT to continue"; exit 0
fi

echo "== evaluation: $EVAL_EPISODES episodes per checkpoint, reset seeds 1-$EVAL_EPISODES"
$PY training/evaluate.py --policy "$OUT/per-arm-small/checkpoints" --episodes "$EVAL_EPISODES" \
    --workers "$WORKERS" --select-best --out "$OUT/eval" --device cpu
