#!/bin/sh
# The same hot scenario through the shim path and through the HTTP check front, alternated in one
# session so both see the same machine: 3 open-loop runs at 2000 auth/s per front, then one
# closed-loop run each. docs/benchmarks.md, "HTTP front vs shim".
#
#   tests/baselines/fronts.sh [BIN_DIR] [OUT_DIR]     # defaults: target/release, target/fronts
set -eu
B=${1:-target/release}
OUT=${2:-target/fronts}
mkdir -p "$OUT"
run() { # NAME ARGS...
    name=$1
    shift
    cat /proc/loadavg >"$OUT/$name.load"
    "$B/extauth-load" --scenario hot --nodes 2 --pool-size 8 --duration 10 --quiet \
        --json "$OUT/$name.json" "$@"
}
for i in 1 2 3; do
    for via in shim http; do
        run "$via-open-$i" --via "$via" --rate 2000
    done
done
for via in shim http; do
    run "$via-closed" --via "$via"
done
for f in "$OUT"/*.json; do
    python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_us"]
print(f'{sys.argv[1].rsplit("/", 1)[-1]:18} {r["via"]:9} {r["throughput"]:8.0f}/s '
      f'p50 {l["p50"]:7.1f} p90 {l["p90"]:7.1f} p99 {l["p99"]:8.1f} p99.9 {l["p999"]:8.1f} us '
      f'wrong {r["wrong_verdicts"]} calls {r["provider_calls"]} ({r["expected_provider_calls"]}) '
      f'broker CPU {r["broker_cpu_us_per_auth"]:.1f} us/auth')
PY
done
