#!/usr/bin/env bash
# `make bench`'s RAG part: starts a server on a free port, runs `kvgate bench rag` against it
# on a corpus that every machine with rustup has (the Rust book), writes JSON and a PNG plot.
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
log=$(mktemp)
# A store of its own, emptied first; KVGATE_BENCH_SERVE_ARGS adds serve flags (e.g. a small
# --ram-budget-bytes so that hits come from disk, or --kv-dtype f32).
data="$out/data"
rm -rf "$data"
# shellcheck disable=SC2086
"$kvgate" serve --listen 127.0.0.1:0 --threads "${THREADS:-2}" --log warn --data-dir "$data" \
    ${KVGATE_BENCH_SERVE_ARGS:-} >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"; rm -rf "$data"' EXIT
for _ in $(seq 100); do
    url=$(sed -n 's/^kvgate listening on //p' "$log")
    if [ -n "$url" ] && curl -sf "$url/ready" >/dev/null; then break; fi
    sleep 0.2
done
[ -n "${url:-}" ] || { echo "the server did not start:" >&2; cat "$log" >&2; exit 1; }
name=${KVGATE_BENCH_NAME:-bench-rag}
# shellcheck disable=SC2086
"$kvgate" bench rag --url "$url" --corpus "$corpus" --json "$out/$name.json" ${KVGATE_BENCH_RAG_ARGS:-}
"$python" "$(dirname "$0")/plot-rag.py" "$out/$name.json" "$out/$name.png"
