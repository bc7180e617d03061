#!/usr/bin/env bash
# Held-out ARIA-H pairs: make them, compare each pair, score (README "Measuring it on synthetic pairs").
#   docs/heldout_pairs.sh [N=20] [SEED=9100] [OUT=heldout_pairs] [extra `synth` options, e.g. --matrix 128x128 --slices 32]
# CMBDETECT overrides the command (default: cmbdetect); LONGITUDINAL_EXTRA adds `longitudinal` options
# (LONGITUDINAL_EXTRA=--no-regions: the seconds per pair without the registration to the template).
set -euo pipefail
N=${1:-20}; SEED=${2:-9100}; OUT=${3:-heldout_pairs}
shift $(( $# < 3 ? $# : 3 ))
CMBDETECT=${CMBDETECT:-cmbdetect}
LONGITUDINAL_EXTRA=${LONGITUDINAL_EXTRA:-}
$CMBDETECT synth --pairs "$N" --seed "$SEED" --out "$OUT/pairs" --quiet "$@"
# Exit 1 when a pair is refused (cannot be registered): the others are done, and evaluate-pairs counts it.
# shellcheck disable=SC2086  # a list of options
$CMBDETECT longitudinal --pairs-csv "$OUT/pairs/pairs.csv" -o "$OUT/changes" $LONGITUDINAL_EXTRA || [ $? -eq 1 ]
$CMBDETECT evaluate-pairs --pred "$OUT/changes" --truth "$OUT/pairs" -o "$OUT/evaluation_pairs.json"
