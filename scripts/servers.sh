# Sourced by the bench scripts: `kvgate serve` processes on free ports, each with its own data
# directory under $work, all stopped — and $work removed — when the script exits.
# Needs $kvgate (the binary); sets $work.
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

# `start NAME ARGS...`: starts `kvgate serve ARGS...`, waits until it is ready and sets
# `started` to its URL. (Not in a subshell: the trap must see every pid.)
start() {
    local name=$1
    shift
    "$kvgate" serve --listen 127.0.0.1:0 --log warn --data-dir "$work/data-$name" "$@" >"$work/$name.log" 2>&1 &
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

# `bench_corpus`: the corpus the bench scripts draw passages from (KVGATE_BENCH_CORPUS, or the
# Rust book that rustup installs), or a message naming the fix and exit.
bench_corpus() {
    corpus=${KVGATE_BENCH_CORPUS:-$(rustc --print sysroot)/share/doc/rust/html/book}
    if [ ! -d "$corpus" ]; then
        echo "corpus $corpus not found: install rust-docs (rustup component add rust-docs) or set KVGATE_BENCH_CORPUS" >&2
        exit 1
    fi
}
