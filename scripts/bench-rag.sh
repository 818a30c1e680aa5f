#!/usr/bin/env bash
# `make bench`'s RAG part: starts two servers on free ports — the one measured, and the floor
# (prefix chunks rounded to f16, as production servers keep KV) — runs `kvgate bench rag`
# against them on a corpus that every machine with rustup has (the Rust book), writes JSON and
# a PNG plot.
#
# The measured server loads a copy of the plugins directory, so that `--selectors` in
# KVGATE_BENCH_RAG_ARGS swaps components in the copy, never in the operator's directory.
set -euo pipefail
kvgate=${1:?usage: bench-rag.sh KVGATE_BIN PYTHON OUT_DIR}
python=${2:?}
out=${3:?}
corpus=${KVGATE_BENCH_CORPUS:-$(rustc --print sysroot)/share/doc/rust/html/book}
if [ ! -d "$corpus" ]; then
    echo "corpus $corpus not found: install rust-docs (rustup component add rust-docs) or set KVGATE_BENCH_CORPUS" >&2
    exit 1
fi
mkdir -p "$out"
plugins_src=${KVGATE_PLUGINS_DIR:-$HOME/.cache/kvgate/plugins}
work=$(mktemp -d)
cp -r "$plugins_src" "$work/plugins"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

# Starts `kvgate serve` with its own data dir and extra flags; sets `started` to its URL.
# (Not in a subshell: the trap must see every pid.)
start() {
    local name=$1
    shift
    # shellcheck disable=SC2086
    "$kvgate" serve --listen 127.0.0.1:0 --threads "${THREADS:-2}" --log warn --data-dir "$work/data-$name" \
        "$@" ${KVGATE_BENCH_SERVE_ARGS:-} >"$work/$name.log" 2>&1 &
    pids+=($!)
    local url=""
    for _ in $(seq 150); do
        url=$(sed -n 's/^kvgate listening on //p' "$work/$name.log")
        if [ -n "$url" ] && curl -sf "$url/ready" >/dev/null; then
            started=$url
            return
        fi
        sleep 0.2
    done
    echo "the $name server did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}
start main --plugins-dir "$work/plugins"
url=$started
start floor --plugins-dir "$work/plugins" --no-watch-plugins --prefix-kv-dtype f16
floor=$started
name=${KVGATE_BENCH_NAME:-bench-rag}
# shellcheck disable=SC2086
"$kvgate" bench rag --url "$url" --floor-url "$floor" --plugins-dir "$work/plugins" --teacher-forced \
    --corpus "$corpus" --json "$out/$name.json" ${KVGATE_BENCH_RAG_ARGS:-}
"$python" "$(dirname "$0")/plot-rag.py" "$out/$name.json" "$out/$name.png"
