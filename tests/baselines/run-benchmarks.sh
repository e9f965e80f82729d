#!/usr/bin/env bash
# Runs every comparison of docs/benchmarks.md in one go, on this machine, and prints the tables.
#
#   cargo build --release --workspace && tests/baselines/run-benchmarks.sh [OUT_DIR] [SECONDS]
#
# Each run writes OUT_DIR/NAME.json (and .svg); summarize.py turns them into the tables and the
# ratios against issue 6's targets. Only 127.0.0.1 and Unix sockets are used; every run is
# bounded by --duration or --requests.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/benchmarks}
SECS=${2:-10}
BIN=target/release
LOAD="$BIN/extauth-load --quiet --duration $SECS"
SEED="python3 tests/baselines/seed_extauth.py"
mkdir -p "$OUT"
: >"$OUT/loadavg.txt"

# Figures taken while a compiler runs on the same 2 cores mean little: wait (at most 5 min) for
# compilers to finish before each run, and record the load average next to the figures.
quiet() {
    # pgrep matches names of at most 15 characters: one name per call.
    for _ in $(seq 300); do
        pgrep -x rustc >/dev/null || pgrep -x clippy-driver >/dev/null || pgrep -x rustdoc >/dev/null || return 0
        sleep 1
    done
    echo "warning: a compiler is still running; figures will be noisy" >&2
}

run() { # NAME ARGS...
    local name=$1; shift
    quiet
    echo "load average before $name: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/loadavg.txt"
    echo "== $name: extauth-load $*" >&2
    $LOAD "$@" --json "$OUT/$name.json" --plot "$OUT/$name.svg" >"$OUT/$name.txt"
    cat "$OUT/$name.txt" >&2
}

# Latency at one request in flight, and throughput with 16 programs (2 nodes x pool 8).
run floor-shim-1     --floor --nodes 1 --pool-size 1
run broker-shim-1    --scenario hot --nodes 1 --pool-size 1
run floor-shim-16    --floor --nodes 2 --pool-size 8
run broker-shim-16   --scenario hot --nodes 2 --pool-size 8
run echo-1           --via program "$BIN/extauth-load echo" --no-verify --nodes 1 --pool-size 1
run echo-16          --via program "$BIN/extauth-load echo" --no-verify --nodes 2 --pool-size 8
run python-echo-16   --via program "$SEED --echo" --no-verify --nodes 2 --pool-size 8
# The seed-style baseline: one HTTP introspection per auth (provider answering at once, and at 20 ms).
run seed-16          --via program "$SEED" --scenario hot --nodes 2 --pool-size 8
run seed-16-20ms     --via program "$SEED" --scenario hot --nodes 2 --pool-size 8 --provider-latency 20
run broker-shim-16-20ms --scenario hot --nodes 2 --pool-size 8 --provider-latency 20
run seed-16-50ms     --via program "$SEED" --scenario hot --nodes 2 --pool-size 8 --provider-latency 50
run broker-shim-16-50ms --scenario hot --nodes 2 --pool-size 8 --provider-latency 50
# Broker direct over the wire protocol (pipelined), cached path.
run floor-wire       --floor --via wire --connections 4 --depth 64
run broker-wire      --scenario hot --via wire --connections 4 --depth 64
# Latency under a given load (open loop, no coordinated omission).
run broker-shim-16-open --scenario hot --nodes 2 --pool-size 8 --rate 10000
# The other scenarios through shims.
run cold-16          --scenario cold --nodes 2 --pool-size 8
run mixed-16         --scenario mixed --nodes 2 --pool-size 8 --tokens 100000 --seed 1
run expiry-16        --scenario expiry --nodes 2 --pool-size 8 --tokens 1000 --expire-after 3

# herd of 1000 over 2 brokers sharing a Redis: 1000 lanes (10 connections x 100) per round.
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REDIS_DIR=$(mktemp -d)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$REDIS_DIR" >/dev/null &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null; rm -rf "$REDIS_DIR"' EXIT
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
run herd-1000-2brokers --scenario herd --via wire --connections 10 --depth 100 --brokers 2 \
    --redis "redis://127.0.0.1:$REDIS_PORT" --requests 10000 --provider-latency 50
run herd-1000-shims-2brokers --scenario herd --nodes 2 --pool-size 500 --brokers 2 \
    --redis "redis://127.0.0.1:$REDIS_PORT" --requests 5000 --provider-latency 50

# Broker memory with 1M cached verdicts (1M distinct tokens, each validated once).
quiet
$BIN/extauth-load --quiet --scenario cold --via wire --connections 4 --depth 64 --requests 1000000 \
    --json "$OUT/rss-1m.json" >"$OUT/rss-1m.txt"
cat "$OUT/rss-1m.txt" >&2

# Shim start-up (exec to exit) and the machine.
perf stat -r 500 "$BIN/extauth-shim" --version 2>"$OUT/shim-start.txt" >/dev/null || true
{ nproc; grep -m1 "model name" /proc/cpuinfo; free -m | sed -n 2p; uname -r; echo "commit $(git rev-parse --short HEAD) + $(git status --short | wc -l) changed files"; } >"$OUT/machine.txt"

python3 tests/baselines/summarize.py "$OUT"
