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
mkdir -p "$out"
plugins_src=${KVGATE_PLUGINS_DIR:-$HOME/.cache/kvgate/plugins}
# shellcheck source=scripts/servers.sh
. "$(dirname "$0")/servers.sh"
bench_corpus
cp -r "$plugins_src" "$work/plugins"
# shellcheck disable=SC2086
start main --threads "${THREADS:-2}" --plugins-dir "$work/plugins" ${KVGATE_BENCH_SERVE_ARGS:-}
url=$started
# shellcheck disable=SC2086
start floor --threads "${THREADS:-2}" --plugins-dir "$work/plugins" --no-watch-plugins --prefix-kv-dtype f16 \
    ${KVGATE_BENCH_SERVE_ARGS:-}
floor=$started
name=${KVGATE_BENCH_NAME:-bench-rag}
# shellcheck disable=SC2086
"$kvgate" bench rag --url "$url" --floor-url "$floor" --plugins-dir "$work/plugins" --teacher-forced \
    --corpus "$corpus" --json "$out/$name.json" ${KVGATE_BENCH_RAG_ARGS:-}
"$python" "$(dirname "$0")/plot-rag.py" "$out/$name.json" "$out/$name.png"
