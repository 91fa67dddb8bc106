#!/usr/bin/env bash
# Regenerates the committed diffusers reference tensors under tests/parity/.
#   tools/parity/run.sh            # uses $PYTHON, else a venv in .venv-parity created from requirements.txt
# The Rust parity tests (tests/parity_*.rs) then compare imago against these files.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/python.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build -q --bin imago
mkdir -p tests/parity/models
for family in sd15 sd21 sd-turbo sdxl sdxl-turbo sd15-inpaint sdxl-inpaint; do
  target/debug/imago dev tiny-model --family "$family" --seed 0 "$work/$family" >/dev/null
done
for family in sd15 sd21 sd-turbo sdxl sdxl-turbo; do
  "$PYTHON" tools/parity/models.py "$work/$family" "$family" "tests/parity/models/$family"
  echo "models: $family"
done
"$PYTHON" tools/parity/edit.py "$work" tests/parity/edit
"$PYTHON" tools/parity/schedulers.py tests/parity/schedulers.safetensors
echo "references written to tests/parity/"
