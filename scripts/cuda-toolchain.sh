#!/usr/bin/env bash
# Build-only CUDA toolkit, so that `cargo build --features cuda` works on a machine with no GPU, no driver and no
# system CUDA (CI, dev boxes). It is assembled from NVIDIA's PyPI wheels (nvcc, headers, CUDA runtime) plus
# link-only stub libraries for what cudarc links dynamically (driver, cuBLAS, cuBLASLt, cuRAND, NVRTC, cuDNN).
# The stubs only satisfy the linker: the binaries built with them load the real NVIDIA libraries at run time,
# so they run only where the driver (and cuDNN) is installed. Never put DEST/lib/stubs on LD_LIBRARY_PATH.
#
# Usage:
#   scripts/cuda-toolchain.sh DEST              create DEST if needed, print the environment as `export` lines
#   eval "$(scripts/cuda-toolchain.sh DEST)"    ... and apply it to the current shell
#   source scripts/cuda-toolchain.sh DEST       same as the eval form
# Idempotent: a DEST that already holds bin/nvcc is reused untouched (delete DEST to rebuild it).
# Environment: PYTHON (default python3) runs pip; CUDA_WHEEL_VERSION and CCCL_WHEEL_SPEC pick the toolkit (below);
# CUDA_COMPUTE_CAP (default 90, i.e. H100/H200) and CUDAFORGE_THREADS (default: all cores) are passed through when
# already set.
# Needs: python3 with pip, gcc, cargo, and network access to PyPI and crates.io.

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: do the work in a child process so that strict mode and helpers stay out of the caller's shell.
    _cuda_toolchain_env=$(bash "${BASH_SOURCE[0]}" "$@") || { unset _cuda_toolchain_env; return 1; }
    eval "$_cuda_toolchain_env"
    unset _cuda_toolchain_env
    return 0
fi

set -euo pipefail

# cudarc 0.19.x accepts nvcc 13.0 to 13.4 only ("Unsupported cuda toolkit version" for 13.5), hence the pins.
# candle's kernels ship as PTX that the driver compiles at load time, and a driver refuses PTX newer than itself
# (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): a binary meant for a machine with an R580 driver (CUDA 13.0) needs
# CUDA_WHEEL_VERSION=13.0.88 CCCL_WHEEL_SPEC='nvidia-cuda-cccl==13.0.85'.
readonly CUDA_WHEEL_VERSION=${CUDA_WHEEL_VERSION:-13.4.92}
readonly CCCL_WHEEL_SPEC=${CCCL_WHEEL_SPEC:-'nvidia-cuda-cccl==13.3.4.3.1.*'}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

log() { echo "cuda-toolchain: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Absolute form of a path whose parent may not exist yet (it is created).
absolute_path() {
    mkdir -p "$(dirname "$1")"
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

# Download the pinned wheels and merge their `nvidia/cu13` trees into $1.
unpack_wheels() {
    local root=$1 wheel_dir unpack_dir
    wheel_dir=$(mktemp -d)
    unpack_dir=$(mktemp -d)
    log "downloading CUDA ${CUDA_WHEEL_VERSION} wheels from PyPI"
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheel_dir" \
        "nvidia-cuda-nvcc==$CUDA_WHEEL_VERSION" "nvidia-cuda-crt==$CUDA_WHEEL_VERSION" \
        "nvidia-nvvm==$CUDA_WHEEL_VERSION" "nvidia-cuda-runtime==$CUDA_WHEEL_VERSION" "$CCCL_WHEEL_SPEC"
    local wheel
    for wheel in "$wheel_dir"/*.whl; do
        "${PYTHON:-python3}" -m zipfile -e "$wheel" "$unpack_dir"
    done
    [[ -f "$unpack_dir/nvidia/cu13/bin/nvcc" ]] || die "the wheels did not contain nvidia/cu13/bin/nvcc"
    mv "$unpack_dir/nvidia/cu13" "$root"
    rm -rf "$wheel_dir" "$unpack_dir"

    # Zip extraction drops the exec bits of the compiler driver and its helpers (cicc, ptxas, fatbinary, ...).
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    # The wheel ships only the versioned runtime; candle-kernels links with plain `-lcudart`.
    ln -sf libcudart.so.13 "$root/lib/libcudart.so"
}

# Source directory of the cudarc crate this repository's lock file resolves to (downloaded if needed).
cudarc_source_dir() {
    cargo metadata --quiet --format-version 1 --features cuda --manifest-path "$REPO_ROOT/Cargo.toml" |
        "${PYTHON:-python3}" -c '
import json, os, sys
packages = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if not packages:
    sys.exit("cudarc is not in the dependency graph of --features cuda")
print(os.path.dirname(packages[0]["manifest_path"]))
'
}

# Names of the C functions declared in the `extern "C"` blocks of a cudarc sys module: what the linker needs.
extern_c_functions() {
    awk '
        /extern "C" \{/ { in_block = 1; next }
        in_block && /^[ \t]*\}/ { in_block = 0; next }
        in_block && match($0, /fn [A-Za-z_][A-Za-z0-9_]*\(/) { print substr($0, RSTART + 3, RLENGTH - 4) }
    ' "$1" | sort -u
}

# Write lib<name>.so into $1 exporting every symbol of cudarc module $3 (from $2), with SONAME $4.
# Each stub returns $5, a "not initialised/stub library" status, should one ever be called by mistake.
make_stub_library() {
    local stub_dir=$1 cudarc_src=$2 module=$3 soname=$4 status=$5
    local source="$stub_dir/${module}_stub.c" symbols symbol
    mapfile -t symbols < <(extern_c_functions "$cudarc_src/src/$module/sys/mod.rs")
    [[ ${#symbols[@]} -gt 0 ]] || die "found no functions in cudarc's $module bindings"
    for symbol in "${symbols[@]}"; do
        printf 'int %s(void) { return %d; }\n' "$symbol" "$status"
    done >"$source"
    gcc -shared -fPIC -Wl,-soname,"$soname" -o "$stub_dir/${soname%%.so*}.so" "$source"
    rm "$source"
}

make_stub_libraries() {
    local root=$1 cudarc_src
    cudarc_src=$(cudarc_source_dir)
    log "generating link stubs from $cudarc_src"
    mkdir -p "$root/lib/stubs"
    make_stub_library "$root/lib/stubs" "$cudarc_src" driver libcuda.so.1 34 # CUDA_ERROR_STUB_LIBRARY
    make_stub_library "$root/lib/stubs" "$cudarc_src" cublas libcublas.so.13 1
    make_stub_library "$root/lib/stubs" "$cudarc_src" cublaslt libcublasLt.so.13 1
    make_stub_library "$root/lib/stubs" "$cudarc_src" curand libcurand.so.10 201
    make_stub_library "$root/lib/stubs" "$cudarc_src" nvrtc libnvrtc.so.13 7
    make_stub_library "$root/lib/stubs" "$cudarc_src" cudnn libcudnn.so.9 1001
}

print_environment() {
    local root=$1
    printf 'export CUDA_ROOT=%q\n' "$root"
    # cudarc runs `nvcc --version` from PATH to pick its bindings; the link search uses $CUDA_ROOT/lib{,/stubs}.
    # shellcheck disable=SC2016 # $PATH is expanded by the shell that applies these lines.
    printf 'export PATH=%q:"$PATH"\n' "$root/bin"
    # There is no nvidia-smi to ask, so the target GPU generation must be given; 90 builds sm_90a kernels.
    printf 'export CUDA_COMPUTE_CAP=%q\n' "${CUDA_COMPUTE_CAP:-90}"
    # cudaforge compiles kernels on half the cores by default.
    printf 'export CUDAFORGE_THREADS=%q\n' "${CUDAFORGE_THREADS:-$(nproc)}"
}

main() {
    [[ $# -eq 1 && -n "$1" ]] || die "usage: $0 DEST"
    local dest
    dest=$(absolute_path "$1")
    if [[ -x "$dest/bin/nvcc" ]]; then
        log "reusing $dest"
    else
        # Built beside DEST and renamed at the end, so an interrupted run never leaves a DEST that looks complete.
        local staging="$dest.partial.$$"
        rm -rf "$staging"
        trap 'rm -rf "$staging"' EXIT
        unpack_wheels "$staging"
        make_stub_libraries "$staging"
        rm -rf "$dest"
        mv "$staging" "$dest"
        trap - EXIT
        log "created $dest"
    fi
    "$dest/bin/nvcc" --version | grep -q "release 13\.[0-4]," ||
        die "$dest/bin/nvcc is not CUDA 13.0-13.4, which cudarc requires"
    print_environment "$dest"
}

main "$@"
