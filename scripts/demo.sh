#!/usr/bin/env bash
# The main job: installs what it needs (scripts/setup_env.sh), then trains a
# small Deformable DETR from scratch on built-in synthetic shapes (1600 steps
# with fixed seeds: about 4 minutes on 2 idle CPU cores, the same AP on any
# machine), evaluates it with COCO AP, saves its checkpoint and a picture of its
# detections, and prints how much faster msda's kernels made a training step
# than the reference op. Extra arguments go to the demo (e.g. --steps 600).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$MSDA_ROOT"
# Idle OpenMP threads sleep instead of spinning (README "OpenMP threads on a
# shared machine"); set here because OpenMP reads it when torch loads.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python benchmarks/quick_check.py
python -m examples.deformable_detr.demo "$@"
