#!/usr/bin/env bash
# imago beside HF diffusers on this machine's CPU (see docs/benchmarks.md), on two model folders both load:
# the SD 1.5 miniature (64×64) and a random-weight folder with SD 1.5's full architecture written by diffusers
# (128×128). Prints the tables and appends them to OUT_DIR/side_by_side.md.
#
#   tools/bench/run.sh [OUT_DIR]     # uses $PYTHON, else a venv in .venv-parity from tools/parity/requirements.txt
#
# Environment: THREADS (default: all cores) for both torch and candle, ROUNDS (default 3) interleaved rounds,
# ITERATIONS (default 3) measured per round, STEPS (default 4).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/python.sh
threads=${THREADS:-$(nproc)}
rounds=${ROUNDS:-3}
iterations=${ITERATIONS:-3}
steps=${STEPS:-4}
out=${1:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cargo build --release --bin imago
imago=target/release/imago
[ -d "$out/tiny-sd15" ] || "$imago" dev tiny-model --family sd15 --seed 0 "$out/tiny-sd15" >/dev/null
[ -d "$out/sd15-random" ] || "$PYTHON" tools/bench/side_by_side.py make-sd15 "$out/sd15-random" \
  --tokenizer "$out/tiny-sd15/tokenizer"

common=(--imago "$imago" --threads "$threads" --rounds "$rounds" --iterations "$iterations" --steps "$steps"
        --scheduler dpm++2m --guidance 7.5 --markdown "$out/side_by_side.md")
"$PYTHON" tools/bench/side_by_side.py compare "${common[@]}" --label tiny-sd15 --model "$out/tiny-sd15" --size 64x64
"$PYTHON" tools/bench/side_by_side.py compare "${common[@]}" --label sd15-random --model "$out/sd15-random" \
  --size 128x128
echo "tables appended to $out/side_by_side.md"
