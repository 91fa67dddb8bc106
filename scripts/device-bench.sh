#!/usr/bin/env bash
# GPU benchmark for a machine with an NVIDIA GPU and no network (e.g. a cloud H200): builds imago
# with CUDA, writes random-weight folders with the full SD 1.5 and SD-Turbo architectures once, and runs
# `imago bench` on each at batch 1 and 4. Where python3 can import diffusers (and torch with CUDA), SD 1.5 at batch 1
# runs side by side with diffusers on the same folder (tools/bench/side_by_side.py, interleaved). About 8 minutes
# including the build on 16 cores; a few without the build.
#
#   scripts/device-bench.sh
#
# Environment:
#   OUT             where the JSON reports and the log go (default target/device-bench)
#   IMAGO_BIN       an imago already built with `--features cuda` (skips the build; cargo is then not needed). Build
#                   it with a toolkit no newer than the GPU machine's driver: candle's kernels are PTX that the driver
#                   compiles at load, and it refuses a newer PTX version (for an R580 driver, CUDA 13.0: see
#                   scripts/cuda-toolchain.sh)
#   CUDA_TOOLKIT    a toolkit folder from scripts/cuda-toolchain.sh, used when no nvcc is on PATH (nothing is
#                   downloaded: the folder must already hold bin/nvcc)
#   DTYPE           f16 (default) or bf16
#   SD15_STEPS      denoising steps of the SD 1.5 runs (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/device-bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
dtype=${DTYPE:-f16}
sd15_steps=${SD15_STEPS:-50}
exec > >(tee "$out/device-bench.log") 2>&1
started=$SECONDS
log() { echo "device-bench [$((SECONDS - started)) s]: $*"; }
die() { log "error: $*"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || die "no NVIDIA GPU visible"

# cuBLAS, cuDNN, cuRAND and NVRTC are loaded at run time; on machines where they come as Python wheels (next to
# PyTorch) their folders are not on the loader's path.
wheel_libs=$(python3 - <<'EOF' 2>/dev/null || true
import glob, os
import nvidia
dirs = {os.path.dirname(p) for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "**", "lib*.so*"),
                                                                        recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
[ -n "$wheel_libs" ] && export LD_LIBRARY_PATH="$wheel_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 1. the binary
if [ -n "${IMAGO_BIN:-}" ]; then
    imago=$IMAGO_BIN
else
    command -v cargo >/dev/null || die "no cargo here: build imago with --features cuda elsewhere and set IMAGO_BIN"
    if ! command -v nvcc >/dev/null; then
        [ -x "${CUDA_TOOLKIT:-}/bin/nvcc" ] || die "no nvcc on PATH and CUDA_TOOLKIT holds no bin/nvcc"
        eval "$(scripts/cuda-toolchain.sh "$CUDA_TOOLKIT")"
    fi
    # Hopper (sm_90) unless the caller says otherwise; candle's kernels are compiled for this one target.
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    log "building (release, cuda, compute capability $CUDA_COMPUTE_CAP)"
    cargo build --release --offline --features cuda --bin imago
    imago=target/release/imago
fi
"$imago" --version
missing=$(ldd "$imago" | grep 'not found' || true)
[ -z "$missing" ] || die "libraries the binary needs are missing:"$'\n'"$missing"

# 2. correctness before speed: the embedded model (all of its convolutions take the cuBLAS product path) must draw
# on the GPU, in f32, the pictures it draws on the CPU, up to rounding
export IMAGO_DEFAULT_MODEL=${IMAGO_DEFAULT_MODEL:-$PWD/models/default}
for device in cpu cuda; do
    "$imago" generate "a red square on a white background" --seed 7 --batch 4 --device "$device" --dtype f32 \
        --no-metadata -o "$out/default-$device.png" >/dev/null || log "generate on $device failed"
done
python3 - "$out" <<'EOF' || log "the GPU's pictures differ from the CPU's"
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
worst = 0.0
for i in range(4):
    cpu, gpu = (np.asarray(Image.open(f"{out}/default-{d}-{i}.png"), dtype=np.float64) for d in ("cpu", "cuda"))
    worst = max(worst, np.abs(cpu - gpu).mean())
print(f"embedded model, CPU against CUDA (f32): mean absolute pixel difference {worst:.3f} of 255 (worst of 4)")
sys.exit(0 if worst < 2.0 else 1)
EOF

# 3. random-weight folders with the published architectures (4.3 and 5.2 GB of f32), each written before its runs
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
write_model() {
    log "writing full-size $1"
    "$imago" dev tiny-model --full-size --family "$1" "$models/$1"
}

# 4. the runs: model, steps, batch, iterations
bench() {
    local family=$1 steps=$2 batch=$3 iterations=$4
    log "bench $family, $steps steps, batch $batch"
    "$imago" bench --model "$models/$family" --device cuda --dtype "$dtype" --width 512 --height 512 \
        --steps "$steps" --batch "$batch" --iterations "$iterations" --warmup 1 \
        --json "$out/$family-b$batch.json" || log "bench $family batch $batch failed"
}
write_model sd15
if python3 -c 'import diffusers, torch; assert torch.cuda.is_available()' 2>/dev/null; then
    log "sd15 beside diffusers, $sd15_steps steps, batch 1"
    python3 tools/bench/side_by_side.py compare --imago "$imago" --model "$models/sd15" --label "SD 1.5 (random)" \
        --size 512x512 --steps "$sd15_steps" --scheduler dpm++2m --guidance 7.5 --device cuda --dtype "$dtype" \
        --rounds 2 --iterations 3 --warmup 1 --markdown "$out/side-by-side.md" --reports "$out/side-by-side" ||
        log "side-by-side failed"
else
    log "no diffusers with CUDA here: imago alone"
    bench sd15 "$sd15_steps" 1 3
fi
bench sd15 "$sd15_steps" 4 2
rm -rf "${models:?}/sd15"
write_model sd-turbo
bench sd-turbo 1 1 10
bench sd-turbo 1 4 10

# 5. one line per run, last, so it is what a truncated log shows
log "summary (it/s, images/s, UNet step ms, p50 job ms, % of peak, peak GPU GiB)"
python3 - "$out" <<'EOF'
import glob, json, os, sys
paths = glob.glob(os.path.join(sys.argv[1], "*.json")) + glob.glob(os.path.join(sys.argv[1], "side-by-side", "imago-*"))
for path in sorted(paths):
    report = json.load(open(path))
    r = report.get("results")
    if r is None:
        print(f"{os.path.basename(path)}: not measured: {report.get('failure')}")
        continue
    gpu = r["peak_gpu_memory_bytes"]
    print(f"{os.path.basename(path)}: {r['steps_per_second']:.2f} it/s, {r['images_per_second']:.2f} img/s, "
          f"step {r['unet_step_ms']['median']:.2f} ms, p50 {r['job_latency_ms']['p50']:.0f} ms, "
          f"{r['percent_of_peak'] or 0:.1f} % of peak, GPU {gpu / 2**30 if gpu else 0:.1f} GiB")
EOF
[ -f "$out/side-by-side.md" ] && cat "$out/side-by-side.md"
log "done"
