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
mkdir -p "$out"
# shellcheck source=scripts/servers.sh
. "$(dirname "$0")/servers.sh"
bench_corpus
serve=(--threads "${THREADS:-1}" --ram-budget-bytes "${RAM_BUDGET:-512MiB}")
start upstream "${serve[@]}" --model-name upstream-smollm2
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
start gateway "${serve[@]}" --config "$work/gateway.toml" --model-name local-smollm2
gateway=$started
"$kvgate" bench gateway --url "$gateway" --watch "$gateway" --watch "$upstream" --corpus "$corpus" \
    --model local-smollm2 --model upstream-smollm2 \
    --header "authorization: Bearer bench-normal" \
    --over-limit-clients 4 --over-limit-header "authorization: Bearer bench-limited" \
    --json "$out/bench-gateway.json" ${KVGATE_BENCH_GATEWAY_ARGS:-}
