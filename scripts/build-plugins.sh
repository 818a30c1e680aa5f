#!/usr/bin/env bash
# Builds the policy components and installs them where the server and its tests load them.
#
#   scripts/build-plugins.sh OUT_DIR
#
#   OUT_DIR/chunker.wasm, selector.wasm, evictor.wasm     the defaults (cdc-chunker,
#                                                         deviation-selector, cost-evictor)
#   OUT_DIR/../test-plugins/<crate>.wasm                  the misbehaving test components
#   OUT_DIR/../example-plugins/<crate>.wasm               examples/plugins/*
#
# A file is replaced only when its content changed, by a rename from a hidden temporary name in
# the same directory, so a server watching OUT_DIR reloads exactly the components that changed
# and never reads a half-written one. Idempotent: a second run rebuilds and installs nothing.
#
# Environment: KVGATE_WASM_TARGET (cargo target dir, default ~/.cache/kvgate/wasm-target, kept
# apart from the host's so the two builds never wait on each other's lock), KVGATE_WASM_JOBS
# (cargo -j, default 1: the machines have 2 cores and the host may be building).
set -euo pipefail

die() { echo "build-plugins: $*" >&2; exit 1; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUT_DIR"
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
tests_out="$(dirname "$out")/test-plugins"
examples_out="$(dirname "$out")/example-plugins"
mkdir -p "$tests_out" "$examples_out"

export CARGO_TARGET_DIR="${KVGATE_WASM_TARGET:-$HOME/.cache/kvgate/wasm-target}"
jobs="${KVGATE_WASM_JOBS:-1}"
built="$CARGO_TARGET_DIR/wasm32-wasip2/release"

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

build() { # MANIFEST
    cargo build --quiet --locked --release --target wasm32-wasip2 -j "$jobs" --manifest-path "$1" \
        || die "cargo build of $1 failed"
}

# install_component CRATE DEST: the component cargo built for CRATE, at DEST, if it differs.
install_component() {
    local src="$built/${1//-/_}.wasm" dest=$2
    [[ -f $src ]] || die "$1: no $src after the build"
    # A component starts with "\0asm" and layer 1 version 0x0d; a core module has version 1.
    local magic
    magic=$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')
    [[ $magic == 0061736d0d000100 ]] || die "$src is not a WebAssembly component (header $magic)"
    if cmp -s "$src" "$dest"; then
        echo "unchanged  $dest"
    else
        local tmp
        tmp="$(dirname "$dest")/.$(basename "$dest").tmp.$$"
        cp "$src" "$tmp" && mv -f "$tmp" "$dest" || { rm -f "$tmp"; die "could not install $dest"; }
        echo "installed  $dest ($(wc -c <"$dest") bytes)"
    fi
}

# The components of a crate directory's Cargo.toml (libraries that are not cdylibs are skipped).
is_component() { grep -q 'crate-type *= *\["cdylib"\]' "$1/Cargo.toml"; }
crate_name() { sed -n 's/^name *= *"\(.*\)"/\1/p' "$1/Cargo.toml" | head -n 1; }

build "$root/plugins/Cargo.toml"
install_component cdc-chunker "$out/chunker.wasm"
install_component attention-selector "$out/selector.wasm"
# The previous default, for operators who want CacheBlend's pure top deviation.
install_component deviation-selector "$examples_out/deviation-selector.wasm"
install_component cost-evictor "$out/evictor.wasm"
for dir in "$root"/plugins/testing/test-*/; do
    is_component "$dir" || continue
    name=$(crate_name "$dir")
    install_component "$name" "$tests_out/$name.wasm"
done

for dir in "$root"/examples/plugins/*/; do
    [[ -f $dir/Cargo.toml ]] || continue
    build "$dir/Cargo.toml"
    name=$(crate_name "$dir")
    install_component "$name" "$examples_out/$name.wasm"
done
