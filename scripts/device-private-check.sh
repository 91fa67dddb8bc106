#!/usr/bin/env bash
# Proves Private Mode's device-memory wipe on a machine with an NVIDIA GPU: builds examples/gpu_residue.rs
# (--release --features cuda) and runs it once. The run takes seconds; the build is nearly all of the cost.
#
#   scripts/device-private-check.sh [TOOLKIT_DIR]
#
# TOOLKIT_DIR  a CUDA 13.0-13.4 toolkit made by scripts/cuda-toolchain.sh (a complete one is reused as it is, with
#              no download). Without it, the machine's own toolkit is used: nvcc on PATH or in /usr/local/cuda.
# Environment:
#   GPU_RESIDUE_BIN      a gpu_residue binary built elsewhere: no build, so the machine needs neither Rust nor nvcc
#   OUT                  if set, gpu-residue.json (the example's summary) and gpu-residue.log are copied there
#   GPU_RESIDUE_TIMEOUT  seconds the check may run (default 300)
#   CARGO_NET_OFFLINE    default true: the GPU machine has no network, so the crates must already be in CARGO_HOME
# Exit status: the example's (0: every check passed), or non-zero when the build or the setup failed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "device-private-check: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# What the binary loads at run time (cudarc links them dynamically); libcuda comes with the driver.
readonly RUNTIME_LIBRARIES=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9)

# Puts a toolkit's nvcc and the settings cudarc and candle's kernel build read into the environment.
use_toolkit() {
    if [[ -n "${1:-}" ]]; then
        eval "$(scripts/cuda-toolchain.sh "$1")"
        return
    fi
    local nvcc
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    [[ -x "$nvcc" ]] || die "no nvcc on PATH or in /usr/local/cuda; pass a toolkit made by scripts/cuda-toolchain.sh"
    CUDA_ROOT=${CUDA_ROOT:-$(cd "$(dirname "$nvcc")/.." && pwd)}
    export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"
    # The GPU is here to ask (sm_90 on an H100/H200).
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)}
    export CUDA_COMPUTE_CAP CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
}

# Folders that may hold the CUDA libraries: the toolkit's, the system's, and those of NVIDIA's Python wheels.
# Link-only stub folders are left out: a stub loaded at run time fails every call.
library_dirs() {
    local root
    for root in "${CUDA_ROOT:-}" /usr/local/cuda; do
        [[ -n "$root" ]] && printf '%s\n' "$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib"
    done
    python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null |
        while read -r package_root; do find "$package_root" -maxdepth 3 -type d -name lib; done
}

# The folder holding library $1 (a soname), or nothing.
find_library() {
    local dir
    while read -r dir; do
        if [[ -e "$dir/$1" && "$dir" != */stubs ]]; then
            echo "$dir"
            return
        fi
    done < <(library_dirs)
}

# cudarc links with plain -l<name>; where a library exists only under its soname (NVIDIA's wheels ship no dev
# symlinks), give the linker a folder of such links to the real files.
provide_link_names() {
    local link_dir=$1 soname dir
    mkdir -p "$link_dir"
    for soname in "${RUNTIME_LIBRARIES[@]}"; do
        dir=$(find_library "$soname")
        if [[ -n "$dir" && ! -e "$dir/${soname%%.so*}.so" ]]; then
            ln -sf "$dir/$soname" "$link_dir/${soname%%.so*}.so"
        fi
    done
    export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link_dir"
}

build_example() {
    command -v cargo >/dev/null || die "no cargo here; build the example elsewhere and pass GPU_RESIDUE_BIN"
    use_toolkit "${1:-}"
    provide_link_names "$scratch/link"
    log "building examples/gpu_residue.rs (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$CUDA_COMPUTE_CAP)"
    export CARGO_NET_OFFLINE=${CARGO_NET_OFFLINE:-true}
    cargo build --release --features cuda --example gpu_residue -j "$(nproc)" >&2
    echo "${CARGO_TARGET_DIR:-target}/release/examples/gpu_residue"
}

# Adds the folders of the run-time libraries to LD_LIBRARY_PATH and fails early if one is missing.
prepare_runtime() {
    local binary=$1 soname dir missing
    for soname in "${RUNTIME_LIBRARIES[@]}"; do
        dir=$(find_library "$soname")
        if [[ -n "$dir" ]]; then
            LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
    export LD_LIBRARY_PATH
    missing=$(ldd "$binary" | grep 'not found' || true)
    [[ -z "$missing" ]] || die "libraries the binary needs are missing:"$'\n'"$missing"
}

main() {
    [[ $# -le 1 ]] || die "usage: $0 [TOOLKIT_DIR]"
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    local binary=${GPU_RESIDUE_BIN:-}
    if [[ -z "$binary" ]]; then
        binary=$(build_example "${1:-}")
    fi
    [[ -x "$binary" ]] || die "$binary is not an executable"
    prepare_runtime "$binary"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true

    local status=0
    timeout "${GPU_RESIDUE_TIMEOUT:-300}" "$binary" >"$scratch/gpu-residue.json" 2>"$scratch/gpu-residue.log" ||
        status=$?
    cat "$scratch/gpu-residue.log" >&2
    cat "$scratch/gpu-residue.json"
    if [[ -n "${OUT:-}" ]]; then
        cp "$scratch/gpu-residue.json" "$scratch/gpu-residue.log" "$OUT/"
    fi
    log "$([[ $status -eq 0 ]] && echo passed || echo "FAILED (exit $status)")"
    return "$status"
}

main "$@"
