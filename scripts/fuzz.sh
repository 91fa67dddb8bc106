#!/usr/bin/env bash
# Fuzzes imago's untrusted-input paths with cargo-fuzz (libFuzzer): every target for SECONDS (default 30) each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      targets: job_json image_decode seal_open (default: all)
#
# Each target starts from its committed seed corpus (fuzz/corpus/<target>/) and writes what it discovers to a
# scratch directory, so the committed corpus only changes on purpose. A crash, a panic, a single allocation over
# the target's limit or a hang stops the run with a non-zero exit; the input that caused it is saved under
# fuzz/artifacts/<target>/ and `cargo fuzz run <target> <file>` replays it.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. The first run
# builds every dependency with sanitizer instrumentation into fuzz/target (tens of minutes on two cores).
set -euo pipefail

readonly SECONDS_PER_TARGET=${1:-30}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(job_json image_decode seal_open)
fi

cd "$(dirname "$0")/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

# The instrumented build's target directory (CI keeps it in its cache between runs).
target_dir=${IMAGO_FUZZ_TARGET_DIR:-fuzz/target}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for target in "${targets[@]}"; do
    # -rss_limit_mb bounds the whole process; -malloc_limit_mb any single allocation: the image decoder is given
    # limits that keep every allocation far below it.
    options=(-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    case $target in
        job_json) options+=(-dict=fuzz/job_json.dict -max_len=4096 -malloc_limit_mb=64) ;;
        image_decode) options+=(-max_len=32768 -malloc_limit_mb=64) ;;
        seal_open) options+=(-max_len=4096 -malloc_limit_mb=64) ;;
        *) echo "unknown fuzz target: $target" >&2; exit 2 ;;
    esac
    mkdir -p "$scratch/$target"
    echo "=== fuzz $target for ${SECONDS_PER_TARGET}s"
    cargo fuzz run --target-dir "$target_dir" "$target" "$scratch/$target" "fuzz/corpus/$target" -- "${options[@]}"
done
