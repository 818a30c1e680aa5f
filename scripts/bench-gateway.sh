#!/usr/bin/env bash
# The gateway soak (`make bench-gateway`): on loopback, a second kvgate serves as the upstream
# (model `upstream-smollm2`), the gateway in front serves the local model (`local-smollm2`)
# and passes the other on, with two API keys: `bench-normal` (tenant team-a, no limit) and
# `bench-limited` (tenant team-b, 30 requests a minute, one at a time). `kvgate bench gateway`
# then runs 32 streaming clients for 2 minutes after a 60 s warm-up over both models with
# caching on, plus 4 clients hammering with the limited key, and samples both servers'
# resident memory. It exits non-zero if anything but the limited key's 429s failed.
#
# Both servers share the machine's cores: each gets THREADS inference threads (default 1).
# Their RAM tiers are 512 MiB so that the warm-up fills them: resident memory after it should
# hold still (the report shows resident memory beside the RAM tier's bytes).
set -euo pipefail
kvgate=${1:?usage: bench-gateway.sh KVGATE_BIN OUT_DIR}
out=${2:?}
corpus=${KVGATE_BENCH_CORPUS:-$(rustc --print sysroot)/share/doc/rust/html/book}
if [ ! -d "$corpus" ]; then
    echo "corpus $corpus not found: install rust-docs (rustup component add rust-docs) or set KVGATE_BENCH_CORPUS" >&2
    exit 1
fi
mkdir -p "$out"
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

# Starts `kvgate serve` with its own data dir and extra flags; sets `started` to its URL.
# (Not in a subshell: the trap must see every pid.)
start() {
    local name=$1
    shift
    "$kvgate" serve --listen 127.0.0.1:0 --threads "${THREADS:-1}" --log warn --data-dir "$work/data-$name" \
        --ram-budget-bytes "${RAM_BUDGET:-512MiB}" "$@" >"$work/$name.log" 2>&1 &
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
start upstream --model-name upstream-smollm2
upstream=$started
cat >"$work/gateway.toml" <<EOF
[[api_key]]
key = "bench-normal"
tenant = "team-a"

[[api_key]]
key = "bench-limited"
tenant = "team-b"
requests_per_minute = 30
max_concurrent = 1

[[upstream]]
name = "second"
url = "$upstream/v1"
models = ["upstream-smollm2"]
timeout_secs = 600
EOF
start gateway --config "$work/gateway.toml" --model-name local-smollm2
gateway=$started
"$kvgate" bench gateway --url "$gateway" --watch "$gateway" --watch "$upstream" --corpus "$corpus" \
    --model local-smollm2 --model upstream-smollm2 \
    --header "authorization: Bearer bench-normal" \
    --over-limit-clients 4 --over-limit-header "authorization: Bearer bench-limited" \
    --warmup 60 --duration 120 --json "$out/bench-gateway.json" ${KVGATE_BENCH_GATEWAY_ARGS:-}
