#!/bin/bash
# Which files one auth request runs through: a debug broker under gdb (trace-gdb.py) with one
# worker thread, the harness's mock provider, and one shim sending the same login three times,
# each awaited: request 1 is a cold auth (one provider call), request 2 an L1 hit. Nothing else
# runs meanwhile, so the entries are in the order they happened.
#
#   tests/baselines/request-path/run.sh BIN_DIR OUT.json   # BIN_DIR: debug extauth-broker, -shim
#   tests/baselines/request-path/files.py OUT.json
#
# The mock provider is `extauth-load provider` from $LOAD (default: BIN_DIR/extauth-load).
set -euo pipefail
bin=$(realpath "$1") out=$(realpath -m "$2") here=$(dirname "$(realpath "$0")")
load=${LOAD:-$bin/extauth-load}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
echo -n trace-secret > "$dir/client.secret"
EXTAUTH_CLIENT_SECRET=trace-secret "$load" provider --listen 127.0.0.1:18089 >/dev/null &
TOKIO_WORKER_THREADS=1 TRACE_OUT=$out gdb -q -batch -ex "set pagination off" \
  -ex "source $here/trace-gdb.py" -ex run --args "$bin/extauth-broker" run \
  --listen "unix:$dir/broker.sock" --introspection-url http://127.0.0.1:18089/introspect \
  --client-id extauth-load --client-secret-file "$dir/client.secret" --domain localhost \
  --log-level warn >"$dir/gdb.log" 2>&1 &
# Setting about 1,400 breakpoints takes gdb a minute or two.
for _ in $(seq 3000); do [ -S "$dir/broker.sock" ] && break; sleep 0.1; done
[ -S "$dir/broker.sock" ] || { cat "$dir/gdb.log"; exit 1; }
python3 - "$bin/extauth-shim" "$dir/broker.sock" "$(( $(date +%s) + 3600 ))" <<'PY'
import struct, subprocess, sys
shim, sock, exp = sys.argv[1:]
p = subprocess.Popen([shim, "--broker", "unix:" + sock, "--timeout", "300"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
line = f"auth:user7:localhost:trace.7.{exp}.n1".encode()  # valid for user7 (extauth-load provider)
for _ in range(3):
    p.stdin.write(struct.pack(">H", len(line)) + line)
    p.stdin.flush()
    assert p.stdout.read(4) == b"\x00\x02\x00\x01", "the login must be accepted"
p.stdin.close()
p.wait()
PY
sleep 1
test -s "$out"
