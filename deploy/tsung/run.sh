#!/usr/bin/env bash
# A tsung login storm through a real two-node ejabberd 23.01 cluster, run twice:
#   shim   ejabberd -> extauth-shim -> extauth-broker -> mock introspection provider
#   local  ejabberd -> `extauth-load echo --check-tokens` (same verdicts, no broker, no network)
# then tsung's figures side by side, and checks that tsung, ejabberd's logs, the broker and the
# provider agree on every count. Exit status 0 only when they do. See deploy/tsung/README.md.
#
# The cluster comes from `extauth-lab ejabberd-cluster`, the launcher of the end-to-end tests
# (tests/kit/src/ejabberd.rs); this script runs the broker, the provider, tsung and the report.
# Facts this relies on (epmd, su, tsung's quirks) are in docs/testing.md; the "pitfall N"
# references below are to it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# ejabberdctl and epmd live in sbin directories, which a non-login root shell may lack.
PATH=$PATH:/usr/sbin:/sbin
T0=$SECONDS

usage() {
    cat <<EOF
usage: deploy/tsung/run.sh [options]

A tsung login storm (N good and B bad OAuth tokens, SASL PLAIN, spread over both nodes) through
a real two-node ejabberd cluster, first with extauth-shim + extauth-broker + the mock provider,
then with a trivial local extauth program giving the same verdicts; prints both side by side.
Needs root, ejabberd 23.01 and tsung 1.7 (apt-get install ejabberd tsung) and the release
binaries (cargo build --release --workspace). Every option also has an environment variable.

  --users N            good tokens, one login each               (STORM_USERS, default 200)
  --bad B              bad tokens: unknown ones and other users'  (STORM_BAD, default 20)
  --rate R             tsung arrivals per second (Poisson)       (STORM_RATE, default 50)
  --pool-size P        extauth_pool_size of each node            (STORM_POOL_SIZE, default 2)
  --relogin            each user logs in a second time with the same token, 1 s later:
                       the broker answers it from its cache (tr_sasl_again)  (STORM_RELOGIN=1)
  --only shim|local    run one storm instead of both             (STORM_ONLY)
  --bin-dir DIR        extauth-broker, extauth-shim, extauth-load, extauth-lab
                       (STORM_BIN_DIR, default $REPO/target/release)
  --out DIR            keep results here: report.txt, summary.env, tsung logs, ejabberd,
                       broker and provider logs (STORM_OUT, default target/tsung/DATE-TIME)
  --c2s-ports P1,P2    c2s ports of node 1 and 2 on 127.0.0.1    (STORM_C2S_PORTS, 5222,5322)
  --epmd-port P        the cluster's own epmd on 127.0.0.1       (STORM_EPMD_PORT, 4369)
  --provider-port P    the mock provider on 127.0.0.1            (STORM_PROVIDER_PORT, 18089)
  --metrics-port P     the broker's /metrics on 127.0.0.1        (STORM_METRICS_PORT, 18090)
  --keep-on-fail       on failure leave everything running and say how to reach and stop
                       it (KEEP_ON_FAIL=1)
  -h, --help           this text
EOF
}

USERS=${STORM_USERS:-200}
BAD=${STORM_BAD:-20}
RATE=${STORM_RATE:-50}
POOL_SIZE=${STORM_POOL_SIZE:-2}
RELOGIN=${STORM_RELOGIN:-0}
ONLY=${STORM_ONLY:-}
BIN_DIR=${STORM_BIN_DIR:-$REPO/target/release}
OUT=${STORM_OUT:-}
C2S_PORTS=${STORM_C2S_PORTS:-5222,5322}
EPMD_PORT=${STORM_EPMD_PORT:-4369}
PROVIDER_PORT=${STORM_PROVIDER_PORT:-18089}
METRICS_PORT=${STORM_METRICS_PORT:-18090}
KEEP=${KEEP_ON_FAIL:-0}

say() { printf '[storm %3ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() {
    printf 'run.sh: %s\n' "$*" >&2
    exit 1
}
value_of() { # FLAG ARGS...: the flag's value, or die
    [ $# -ge 2 ] || die "$1 needs a value (see --help)"
    printf '%s' "$2"
}

while [ $# -gt 0 ]; do
    case $1 in
    --users) USERS=$(value_of "$@"); shift 2 ;;
    --bad) BAD=$(value_of "$@"); shift 2 ;;
    --rate) RATE=$(value_of "$@"); shift 2 ;;
    --pool-size) POOL_SIZE=$(value_of "$@"); shift 2 ;;
    --only) ONLY=$(value_of "$@"); shift 2 ;;
    --bin-dir) BIN_DIR=$(value_of "$@"); shift 2 ;;
    --out) OUT=$(value_of "$@"); shift 2 ;;
    --c2s-ports) C2S_PORTS=$(value_of "$@"); shift 2 ;;
    --epmd-port) EPMD_PORT=$(value_of "$@"); shift 2 ;;
    --provider-port) PROVIDER_PORT=$(value_of "$@"); shift 2 ;;
    --metrics-port) METRICS_PORT=$(value_of "$@"); shift 2 ;;
    --relogin) RELOGIN=1 && shift ;;
    --keep-on-fail) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument ${1@Q} (see --help)" ;;
    esac
done

# ----- options -----

is_count() { [[ $1 =~ ^[0-9]+$ ]] && [ "${#1}" -le 7 ]; }
is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "${#1}" -le 5 ] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
is_count "$USERS" || die "--users wants a whole number, got ${USERS@Q}"
is_count "$BAD" || die "--bad wants a whole number, got ${BAD@Q}"
[ $((USERS + BAD)) -ge 1 ] || die "nothing to do: --users and --bad are both 0"
if ! is_count "$POOL_SIZE" || [ "$POOL_SIZE" -lt 1 ]; then
    die "--pool-size wants a number >= 1, got ${POOL_SIZE@Q}"
fi
if ! [[ $RATE =~ ^[0-9]{1,6}(\.[0-9]{1,6})?$ ]] || ! awk -v r="$RATE" 'BEGIN { exit !(r > 0) }'; then
    die "--rate wants a positive number of arrivals per second, got ${RATE@Q}"
fi
case $RELOGIN in
0) PASSES=1 ;;
1) PASSES=2 ;;
*) die "STORM_RELOGIN wants 0 or 1, got ${RELOGIN@Q}" ;;
esac
case $ONLY in
"") RUNS=(shim local) ;;
shim | local) RUNS=("$ONLY") ;;
*) die "--only wants shim or local, got ${ONLY@Q}" ;;
esac
IFS=, read -r C2S_PORT1 C2S_PORT2 <<<"$C2S_PORTS"
for p in "$C2S_PORT1" "$C2S_PORT2" "$EPMD_PORT" "$PROVIDER_PORT" "$METRICS_PORT"; do
    is_port "$p" || die "not a port: ${p@Q}"
done
[ "$(printf '%s\n' "$C2S_PORT1" "$C2S_PORT2" "$EPMD_PORT" "$PROVIDER_PORT" "$METRICS_PORT" | sort -u | wc -l)" = 5 ] ||
    die "the five ports must differ: c2s $C2S_PORT1,$C2S_PORT2 epmd $EPMD_PORT provider $PROVIDER_PORT metrics $METRICS_PORT"
LOGINS=$((USERS + BAD))
[ -n "$OUT" ] || OUT=$REPO/target/tsung/$(date +%Y%m%d-%H%M%S)

# ----- prerequisites -----

[ "$(id -u)" = 0 ] || die "run as root: Debian's ejabberdctl runs the nodes as user ejabberd via su (docs/testing.md, pitfall 2)"
for cmd in ejabberdctl epmd erl tsung openssl base64 od awk timeout install mkfifo; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found; install the prerequisites: apt-get install ejabberd tsung openssl"
done
for bin in extauth-broker extauth-shim extauth-load extauth-lab; do
    [ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin not found; build it: (cd $REPO && cargo build --release --workspace), or give --bin-dir"
done
EJ_UID=$(id -u ejabberd 2>/dev/null) || die "no system user ejabberd (it comes with the ejabberd package)"
getent group ejabberd >/dev/null || die "no group ejabberd (it comes with the ejabberd package)"
id -u nobody >/dev/null 2>&1 || die "no user nobody (the broker drops to it)"

# A connection that succeeds means somebody listens there, on 127.0.0.1, 0.0.0.0 or :: alike
# (a stock ejabberd listens on :: 5222).
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$C2S_PORT1" "$C2S_PORT2" "$EPMD_PORT" "$PROVIDER_PORT" "$METRICS_PORT"; do
    if port_taken "$p"; then
        die "port 127.0.0.1:$p is taken (a stock ejabberd or epmd? another run?); stop it or choose other ports (--help)"
    fi
done

# ----- state, and cleanup of everything started -----

SCR=""          # scratch dir: the storms' dirs, copies of the binaries user ejabberd runs
LAB_PID=""      # `extauth-lab ejabberd-cluster`: the current storm's cluster
LAB_FD=""       # the only writer of extauth-lab's stdin: closing it stops the cluster
declare -A LAB  # what extauth-lab printed: NODE1_NAME, NODE1_DIR, NODE1_BEAM_PID, EPMD_PID, ...
PROVIDER_PID="" # the mock provider
BROKER_PID=""   # the broker
TSUNG_PID=""    # `timeout ... tsung`, leader of tsung's process group
RUN_DIR=""      # scratch dir of the current storm
FAILURES=()     # checks that did not hold

alive() { # PID: exists and is no zombie (PID 1 here reaps late, pitfall 12)
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<<"${stat##*) }"
    [ "${f[0]}" != Z ] && [ "${f[0]}" != X ]
}
stop_child() { # PID NAME: SIGTERM, up to 10 s, then SIGKILL; reaps it
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$2 (pid $pid) ignored SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$rc" != 0 ] && [ "$KEEP" = 1 ] && [ -n "$SCR" ]; then
        keep_running "$rc"
        exit "$rc"
    fi
    if [ -n "$TSUNG_PID" ]; then
        kill -TERM -- "-$TSUNG_PID" 2>/dev/null
        wait "$TSUNG_PID" 2>/dev/null
        TSUNG_PID=""
    fi
    stop_cluster
    stop_broker
    stop_provider
    if [ -n "$SCR" ]; then
        rm -rf "$SCR"
    fi
    exit "$rc"
}

keep_running() {
    # A `keep` line makes extauth-lab hand the cluster over and say how to reach and stop it (a
    # subshell writes it: should extauth-lab be gone, SIGPIPE ends the subshell, not us). One
    # that failed to start with KEEP_ON_FAIL=1 has said so already.
    if [ -n "$LAB_PID" ]; then
        (printf 'keep\n' >&"$LAB_FD") 2>/dev/null
        wait "$LAB_PID" 2>/dev/null
    fi
    {
        echo
        echo "KEEP_ON_FAIL: left running (exit status $1); results so far in $OUT"
        echo "  scratch dir $SCR (current storm: ${RUN_DIR:-none})"
        if [ -n "$RUN_DIR" ] && [ -f "$RUN_DIR/lab.log" ]; then
            sed -n 's/^.*\(cluster left running\)/  \1/p; /cluster left running/,$ { /cluster left running/!p }' "$RUN_DIR/lab.log"
        fi
        if [ -n "$BROKER_PID$PROVIDER_PID" ]; then
            echo "  broker pid ${BROKER_PID:-none}, mock provider pid ${PROVIDER_PID:-none}: kill $BROKER_PID $PROVIDER_PID"
        fi
        echo "  then: rm -rf $SCR"
    } >&2
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----- helpers -----

# render TEMPLATE NAME=VALUE...: the template with each @NAME@ replaced. Quoted replacements, so
# bash 5.2's patsub_replacement does not read `&` in a value as the matched text.
render() {
    local text kv
    text=$(<"$1")
    shift
    for kv in "$@"; do
        text=${text//"@${kv%%=*}@"/"${kv#*=}"}
    done
    if [[ $text =~ @[A-Z_0-9]+@ ]]; then
        die "template $1: ${BASH_REMATCH[0]} left unreplaced"
    fi
    printf '%s\n' "$text"
}
random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
c2s_port() { if [ "$1" = 1 ]; then echo "$C2S_PORT1"; else echo "$C2S_PORT2"; fi; }
wait_port() { # PORT SECONDS: until something accepts on 127.0.0.1:PORT
    local deadline=$((SECONDS + $2))
    until port_taken "$1"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}
fail() { # a check that did not hold
    FAILURES+=("$*")
    say "CHECK FAILED: $*"
}
check_eq() { # WHAT ACTUAL EXPECTED
    [ "$2" = "$3" ] || fail "$1: $2, expected $3"
}

# ----- the cluster: extauth-lab, the launcher of the tests (tests/kit/src/ejabberd.rs) -----

# Starts the current storm's cluster with PROGRAM as every node's extauth_program, and reads what
# extauth-lab prints (ports, node names, PIDs, node dirs) into LAB. extauth-lab stays in the
# foreground until its stdin ends: we hold the only writer (LAB_FD), so the cluster stops when
# stop_cluster closes it, or when this script dies, even by SIGKILL.
start_cluster() { # PROGRAM
    local fifo="$RUN_DIR/lab.in" env="$RUN_DIR/lab.env" line t0=$SECONDS
    mkfifo -m 0600 "$fifo"
    KEEP_ON_FAIL=$KEEP "$BIN_DIR/extauth-lab" ejabberd-cluster --program "$1" --nodes 2 \
        --pool-size "$POOL_SIZE" --c2s-port "$C2S_PORT1,$C2S_PORT2" --epmd-port "$EPMD_PORT" \
        --dir "$RUN_DIR/cluster" <"$fifo" >"$env" 2>"$RUN_DIR/lab.log" &
    LAB_PID=$!
    exec {LAB_FD}>"$fifo"
    until grep -qsx READY=1 "$env"; do
        alive "$LAB_PID" || die "the cluster did not start: $(tail -n 80 "$RUN_DIR/lab.log")"
        sleep 0.2
    done
    LAB=()
    while IFS= read -r line; do
        LAB[${line%%=*}]=${line#*=}
    done <"$env"
    say "cluster up in $((SECONDS - t0)) s: ${LAB[NODE1_NAME]} 127.0.0.1:$C2S_PORT1 (pid ${LAB[NODE1_BEAM_PID]}), ${LAB[NODE2_NAME]} 127.0.0.1:$C2S_PORT2 (pid ${LAB[NODE2_BEAM_PID]}), $POOL_SIZE extauth programs each"
}

# The end of its stdin makes extauth-lab stop the nodes (ejabberdctl stop, about 3 to 5 s, then
# SIGKILL for whatever is left) and epmd, and exit. The node dirs stay, logs included.
stop_cluster() {
    [ -n "$LAB_PID" ] || return 0
    local i
    exec {LAB_FD}>&-
    for i in $(seq 1 600); do
        alive "$LAB_PID" || break
        sleep 0.1
    done
    if alive "$LAB_PID"; then
        say "extauth-lab (pid $LAB_PID) did not stop the cluster within 60 s: SIGKILL (its watchdog kills the nodes)"
        kill -KILL "$LAB_PID" 2>/dev/null || true
    fi
    wait "$LAB_PID" 2>/dev/null || say "extauth-lab: exit status $?; see $RUN_DIR/lab.log"
    LAB_PID=""
}

# ----- the broker and the mock provider -----

start_provider() { # OUT_DIR
    EXTAUTH_CLIENT_SECRET="$SECRET" "$BIN_DIR/extauth-load" provider --listen "127.0.0.1:$PROVIDER_PORT" \
        </dev/null >"$1/provider.log" 2>&1 &
    PROVIDER_PID=$!
    wait_port "$PROVIDER_PORT" 10 || die "the mock provider did not listen on 127.0.0.1:$PROVIDER_PORT: $(cat "$1/provider.log")"
}

# The broker binds as root, then runs as nobody with group ejabberd: its socket (mode 0660) is
# then nobody:ejabberd, and the shims, running as ejabberd, may connect (default peer policy:
# members of the socket's group).
start_broker() { # OUT_DIR
    EXTAUTH_CLIENT_SECRET="$SECRET" "$BIN_DIR/extauth-broker" \
        --listen "unix:$RUN_DIR/broker.sock" \
        --introspection-url "http://127.0.0.1:$PROVIDER_PORT/introspect" --client-id extauth-load \
        --metrics-listen "127.0.0.1:$METRICS_PORT" \
        --user nobody --group ejabberd \
        </dev/null >"$1/broker.log" 2>&1 &
    BROKER_PID=$!
    local deadline=$((SECONDS + 10))
    until [ -S "$RUN_DIR/broker.sock" ] && port_taken "$METRICS_PORT"; do
        if ! alive "$BROKER_PID" || [ "$SECONDS" -ge "$deadline" ]; then
            die "the broker did not start: $(cat "$1/broker.log")"
        fi
        sleep 0.1
    done
}
stop_broker() {
    stop_child "$BROKER_PID" broker
    BROKER_PID=""
}
stop_provider() {
    stop_child "$PROVIDER_PID" "mock provider"
    PROVIDER_PID=""
}

# GET http://127.0.0.1:PORT/PATH with bash alone (HTTP/1.0: the server closes when done).
http_get() {
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3 && cat <&3' \
        http_get "$1" "$2"
}
# metric_sum TEXT NAME [LABEL...]: the sum of every sample of NAME carrying all the labels.
metric_sum() {
    local text=$1 name=$2
    shift 2
    awk -v name="$name" -v labels="$*" '
        BEGIN { n = split(labels, want, " ") }
        index($0, name) == 1 && (substr($0, length(name) + 1, 1) == "{" || substr($0, length(name) + 1, 1) == " ") {
            for (i = 1; i <= n; i++) if (index($0, want[i]) == 0) next
            sum += $NF
        }
        END { printf "%d\n", sum }' <<<"$text"
}
# broker_counts: "PROVIDER_CALLS AUTH_ACCEPTED AUTH_REFUSED" from the broker's /metrics.
broker_counts() {
    local text
    text=$(http_get "$METRICS_PORT" /metrics) || die "cannot read the broker's /metrics on 127.0.0.1:$METRICS_PORT"
    echo "$(metric_sum "$text" extauth_provider_calls_total)" \
        "$(metric_sum "$text" extauth_requests_total 'command="auth"' 'result="accepted"')" \
        "$(metric_sum "$text" extauth_requests_total 'command="auth"' 'result="refused"')"
}

# ----- logins -----

# The CSV tsung reads (user;token), one line per login. Tokens are the mock provider's
# self-describing ones (tests/load/src/scenario.rs): RUN.N.EXP.NONCE is valid for userN until EXP.
# userN (N = 1..USERS) gets its own valid token. The BAD logins are spread evenly among them,
# by users USERS+1.., alternately with a token the provider does not know (RUN.x.J: refused as
# inactive) and with another user's valid token (refused as wrong_user). Every line is a
# distinct (user, token) pair, so the broker asks the provider once per line.
write_logins() { # FILE RUN EXP
    awk -v n="$USERS" -v b="$BAD" -v run="$2" -v expiry="$3" 'BEGIN {
        total = n + b
        for (k = 1; k <= total; k++) {
            if (int(k * b / total) > bad) {
                bad++
                user = "user" (n + bad)
                if (bad % 2 == 1 || n == 0) token = run ".x." bad
                else token = run "." ((bad - 1) % n + 1) "." expiry ".stolen" bad
            } else {
                good++
                user = "user" good
                token = run "." good "." expiry "." good
            }
            print user ";" token
        }
    }' >"$1"
}

# One SASL PLAIN login over plain TCP with bash alone: prints success, failure or error. Used to
# warm each node up before the storm: a fresh node's first login takes 115-195 ms because Erlang
# loads modules on first use (docs/testing.md), which would otherwise land in tsung's figures.
xmpp_login() { # PORT USER TOKEN
    local fd creds reply="" chunk rc deadline=$((SECONDS + 10))
    creds=$(printf '\0%s\0%s' "$2" "$3" | base64 -w0)
    exec {fd}<>"/dev/tcp/127.0.0.1/$1" || {
        echo error
        return 0
    }
    printf "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>" 1>&"$fd"
    while [[ $reply != *"</stream:features>"* ]] && [ "$SECONDS" -lt "$deadline" ]; do
        rc=0
        IFS= read -r -t 1 -d '>' -u "$fd" chunk || rc=$?
        reply+=$chunk
        [ "$rc" = 0 ] && reply+='>'
        [ "$rc" = 1 ] && break # end of stream
    done
    printf "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>" "$creds" 1>&"$fd"
    reply=""
    while [[ $reply != *"<success"* && $reply != *"<failure"* ]] && [ "$SECONDS" -lt "$deadline" ]; do
        rc=0
        IFS= read -r -t 1 -d '>' -u "$fd" chunk || rc=$?
        reply+=$chunk
        [ "$rc" = 0 ] && reply+='>'
        [ "$rc" = 1 ] && break
    done
    printf '</stream:stream>' 1>&"$fd" 2>/dev/null || true
    exec {fd}>&-
    case $reply in
    *"<success"*) echo success ;;
    *"<failure"*) echo failure ;;
    *) echo error ;;
    esac
}

# ----- tsung -----

# tsung.log keeps, per name, the figures of the last 10 s interval and those before it:
# sample lines are "stats: NAME COUNT MEAN STDDEV MAX MIN MEAN_BEFORE COUNT_BEFORE" (max and
# min over the whole run), counters "stats: NAME INTERVAL TOTAL" (tsung_controller's
# ts_stats_mon.erl). The last line of each name has the totals.
tsung_sample() { # LOG NAME: "COUNT MEAN MAX" over the whole run (ms), or "0 - -"
    awk -v name="$2" '$1 == "stats:" && $2 == name { last = $0 }
        END {
            if (last == "") { print "0 - -"; exit }
            split(last, f, " ")
            count = f[3] + f[9]
            mean = count ? (f[3] * f[4] + f[9] * f[8]) / count : 0
            printf "%d %.2f %.2f\n", count, mean, f[6]
        }' "$1"
}
# With backend="fullstats" tsung also writes every sample to tsung-fullstats.log, as Erlang terms
# ({sample,tr_sasl_auth,1.234}): percentiles need them, the text log has only means and extremes.
tsung_percentiles() { # FULLSTATS_LOG NAME: "P50 P90 P99" (ms, nearest rank), or "- - -"
    { grep -o "{sample,$2,[0-9.e+-]*}" "$1" || true; } | sed 's/^.*,//; s/}$//' | sort -g | awk '
        { v[NR] = $1 }
        function rank(p,  r) { r = int(p * NR); if (r < p * NR) r++; return v[r < 1 ? 1 : r] }
        END { if (NR == 0) print "- - -"; else printf "%.2f %.2f %.2f\n", rank(0.5), rank(0.9), rank(0.99) }'
}
tsung_counter() { # LOG NAME: total of a counter, 0 when never counted
    awk -v name="$2" '$1 == "stats:" && $2 == name { last = $4 } END { printf "%d\n", last }' "$1"
}
tsung_errors() { # LOG: total of every error_* counter
    awk '$1 == "stats:" && $2 ~ /^error_/ { last[$2] = $4 } END { for (k in last) sum += last[k]; printf "%d\n", sum }' "$1"
}

# The second login of --relogin: same user and token (tsung keeps them in the session), a new
# connection (tsung reconnects when the server has closed the last one).
RELOGIN_XML='      <thinktime value="1"/>
      <request>
        <jabber type="connect" ack="local"/>
      </request>
      <thinktime value="1"/>
      <transaction name="sasl_again">
        <request>
          <match do="continue" when="match">&lt;success</match>
          <jabber type="auth_sasl" ack="local"/>
        </request>
      </transaction>
      <request>
        <jabber type="close" ack="no_ack"/>
      </request>'

run_tsung() { # OUT_DIR
    local out=$1 phase limit rc=0 log relogin=""
    if [ "$PASSES" = 2 ]; then relogin=$RELOGIN_XML; fi
    # Poisson arrivals: give the phase twice the mean time the logins need (pitfall 10f); tsung
    # stops as soon as the last user is launched and done.
    phase=$(awk -v l="$LOGINS" -v r="$RATE" 'BEGIN { printf "%d\n", 2 * l / r + 10 }')
    limit=$((phase + 120))
    mkdir -p "$RUN_DIR/tsung-home" "$RUN_DIR/tsung-log"
    render "$HERE/login-storm.xml.in" \
        "MAXUSERS=$((LOGINS + 100))" "C2S_PORT1=$C2S_PORT1" "C2S_PORT2=$C2S_PORT2" \
        "PHASE_SECONDS=$phase" "LOGINS=$LOGINS" "RATE=$RATE" "CSV=$RUN_DIR/logins.csv" \
        "RELOGIN=$relogin" \
        >"$RUN_DIR/login-storm.xml"
    cp "$RUN_DIR/login-storm.xml" "$RUN_DIR/logins.csv" "$out/"
    say "tsung: $LOGINS users at $RATE/s over both nodes, $PASSES login(s) each (phase up to $phase s)"
    # HOME: tsung writes ~/.tsung (pitfall 10a); -n: no web GUI on :8091 (10b); ERL_FLAGS: its
    # distribution port on loopback only (10c), and no epmd of its own; -l: its own log dir
    # per run (10g). `timeout` runs tsung in a process group of its own, which cleanup kills.
    # {LAB_FD}>&-: tsung must not hold extauth-lab's stdin open (see start_cluster).
    HOME="$RUN_DIR/tsung-home" ERL_EPMD_PORT="$EPMD_PORT" \
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false" \
        timeout -k 10 "$limit" tsung -n -f "$RUN_DIR/login-storm.xml" -l "$RUN_DIR/tsung-log" start \
        </dev/null >"$out/tsung.out" 2>&1 {LAB_FD}>&- &
    TSUNG_PID=$!
    wait "$TSUNG_PID" || rc=$?
    TSUNG_PID=""
    cp -r "$RUN_DIR/tsung-log" "$out/tsung"
    [ "$rc" = 0 ] || die "tsung failed (exit status $rc); see $out/tsung.out and $out/tsung"
    log=$(find "$RUN_DIR/tsung-log" -name tsung.log | head -n 1)
    [ -n "$log" ] || die "tsung wrote no tsung.log; see $out/tsung.out"
    TSUNG_LOG=$log
}

# ----- one storm -----

declare -A R     # results, by "RUN.KEY"
KEYS=()          # their order in summary.env
put() { # RUN KEY VALUE
    [ -n "${R[$1.$2]+set}" ] || KEYS+=("$1.$2")
    R[$1.$2]=$3
}

put_transaction() { # RUN NAME: tsung's figures of transaction NAME
    local sample pct
    read -r -a sample < <(tsung_sample "$TSUNG_LOG" "$2")
    read -r -a pct < <(tsung_percentiles "${TSUNG_LOG%/*}/tsung-fullstats.log" "$2")
    put "$1" "$2.count" "${sample[0]}"
    put "$1" "$2.mean_ms" "${sample[1]}"
    put "$1" "$2.p50_ms" "${pct[0]}"
    put "$1" "$2.p90_ms" "${pct[1]}"
    put "$1" "$2.p99_ms" "${pct[2]}"
    put "$1" "$2.max_ms" "${sample[2]}"
}

storm() { # shim | local
    local name=$1 out="$OUT/$1" program run exp n w t0=$SECONDS
    local before=(0 0 0) after counts
    RUN_DIR=$SCR/$name
    mkdir -p "$RUN_DIR" "$out"
    say "=== storm '$name': $USERS good + $BAD bad tokens, extauth_pool_size $POOL_SIZE"
    if [ "$name" = shim ]; then
        start_provider "$out"
        start_broker "$out"
        program="$SCR/bin/extauth-shim --broker unix:$RUN_DIR/broker.sock --timeout 10"
    else
        program="$SCR/bin/extauth-load echo --check-tokens"
    fi
    run=$(random_hex 4)
    exp=$(($(date +%s) + 86400))
    write_logins "$RUN_DIR/logins.csv" "$run" "$exp"
    start_cluster "$program"

    # Warm-up: one login of user0 per node (not part of the storm, not counted below).
    for n in 1 2; do
        w=$(xmpp_login "$(c2s_port "$n")" user0 "$run.0.$exp.warmup")
        [ "$w" = success ] || die "warm-up login on node $n: $w (expected success); see ${LAB[NODE${n}_DIR]}/logs and extauth.stderr"
    done
    if [ "$name" = shim ]; then
        counts=$(broker_counts)
        read -r -a before <<<"$counts"
    fi

    # The machine may be shared: note how busy it was when the storm began.
    put "$name" loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
    run_tsung "$out"
    # ejabberd's logger writes asynchronously: let the last logins' lines land.
    sleep 1

    local connect session
    put_transaction "$name" tr_sasl_auth
    if [ "$PASSES" = 2 ]; then put_transaction "$name" tr_sasl_again; fi
    read -r -a connect < <(tsung_sample "$TSUNG_LOG" connect)
    read -r -a session < <(tsung_sample "$TSUNG_LOG" session)
    put "$name" connect.count "${connect[0]}"
    put "$name" connect.mean_ms "${connect[1]}"
    put "$name" connect.max_ms "${connect[2]}"
    put "$name" session.count "${session[0]}"
    put "$name" session.mean_ms "${session[1]}"
    put "$name" session.max_ms "${session[2]}"
    put "$name" match "$(tsung_counter "$TSUNG_LOG" match)"
    put "$name" nomatch "$(tsung_counter "$TSUNG_LOG" nomatch)"
    put "$name" users_launched "$(tsung_counter "$TSUNG_LOG" users_count)"
    put "$name" users_finished "$(tsung_counter "$TSUNG_LOG" finish_users_count)"
    put "$name" tsung_errors "$(tsung_errors "$TSUNG_LOG")"

    # ejabberd's own account of the storm, from each node's log: the storm's users are user1 and
    # up; user0 is the warm-up's.
    local acc=0 rej=0 a r
    for n in 1 2; do
        a=$(grep -c 'Accepted c2s PLAIN authentication for user[1-9][0-9]*@' "${LAB[NODE${n}_DIR]}/logs/ejabberd.log" || true)
        r=$(grep -c 'Failed c2s PLAIN authentication for user[1-9][0-9]*@' "${LAB[NODE${n}_DIR]}/logs/ejabberd.log" || true)
        put "$name" "ejabberd.node$n.accepted" "$a"
        put "$name" "ejabberd.node$n.failed" "$r"
        acc=$((acc + a))
        rej=$((rej + r))
    done
    put "$name" ejabberd.accepted "$acc"
    put "$name" ejabberd.failed "$rej"

    if [ "$name" = shim ]; then
        counts=$(broker_counts)
        read -r -a after <<<"$counts"
        put shim broker.accepted "$((after[1] - before[1]))"
        put shim broker.refused "$((after[2] - before[2]))"
        put shim provider_calls "$((after[0] - before[0]))"
        put shim provider_calls_with_warmup "${after[0]}"
    fi

    check_storm "$name"
    if [ ${#FAILURES[@]} -gt 0 ] && [ "$KEEP" = 1 ]; then
        exit 1 # cleanup() leaves everything running
    fi
    stop_cluster
    cp "$RUN_DIR/lab.log" "$out/cluster.log"
    for n in 1 2; do
        for f in logs/ejabberd.log logs/error.log extauth.stderr; do
            [ -f "${LAB[NODE${n}_DIR]}/$f" ] && cp "${LAB[NODE${n}_DIR]}/$f" "$out/node$n-${f##*/}"
        done
    done
    if [ "$name" = shim ]; then
        stop_broker
        stop_provider
        # The mock prints the calls it answered when it stops: warm-up included.
        put shim mock_provider_calls "$(sed -n 's/^mock provider: \([0-9]*\) calls answered.*/\1/p' "$out/provider.log")"
        check_eq "shim: calls the mock answered vs calls the broker made" \
            "${R[shim.mock_provider_calls]:-?}" "${R[shim.provider_calls_with_warmup]}"
    fi
    say "storm '$name' done in $((SECONDS - t0)) s"
}

check_storm() { # RUN: do tsung, ejabberd and the broker tell the same story?
    local r=$1 accepted=$((PASSES * USERS)) refused=$((PASSES * BAD))
    check_eq "$r: tsung users launched" "${R[$r.users_launched]}" "$LOGINS"
    check_eq "$r: tsung users finished" "${R[$r.users_finished]}" "$LOGINS"
    check_eq "$r: tsung errors" "${R[$r.tsung_errors]}" 0
    check_eq "$r: tr_sasl_auth count" "${R[$r.tr_sasl_auth.count]}" "$LOGINS"
    if [ "$PASSES" = 2 ]; then
        check_eq "$r: tr_sasl_again count" "${R[$r.tr_sasl_again.count]}" "$LOGINS"
    fi
    check_eq "$r: tsung match (<success/>)" "${R[$r.match]}" "$accepted"
    check_eq "$r: tsung nomatch" "${R[$r.nomatch]}" "$refused"
    check_eq "$r: ejabberd accepted logins (both nodes)" "${R[$r.ejabberd.accepted]}" "$accepted"
    check_eq "$r: ejabberd failed logins (both nodes)" "${R[$r.ejabberd.failed]}" "$refused"
    # Both nodes served logins (random server choice: all of 20 on one node has odds 2^-19).
    if [ "$LOGINS" -ge 20 ]; then
        for n in 1 2; do
            [ $((${R[$r.ejabberd.node$n.accepted]} + ${R[$r.ejabberd.node$n.failed]})) -gt 0 ] ||
                fail "$r: node $n served no login"
        done
    fi
    if [ "$r" = shim ]; then
        check_eq "shim: broker auth accepted" "${R[shim.broker.accepted]}" "$accepted"
        check_eq "shim: broker auth refused" "${R[shim.broker.refused]}" "$refused"
        # One call per distinct (user, token) at most, second logins included (positive verdicts
        # live 300 s, negative ones 10 s, and the second login comes about 2 s after the first);
        # every good token needs its one call.
        local calls=${R[shim.provider_calls]}
        [ "$calls" -le "$LOGINS" ] || fail "shim: $calls provider calls for $LOGINS distinct logins"
        [ "$calls" -ge "$USERS" ] || fail "shim: $calls provider calls for $USERS accepted new tokens"
    fi
}

# ----- report -----

label() { case $1 in shim) echo "shim + broker" ;; local) echo "local check-tokens" ;; esac; }

report() {
    local runs=("${RUNS[@]}") head row k r
    local transactions=(tr_sasl_auth) t ratios=()
    if [ "$PASSES" = 2 ]; then transactions+=(tr_sasl_again); fi
    if [ ${#runs[@]} = 2 ]; then
        for t in "${transactions[@]}"; do
            for k in mean p50 p99; do
                put ratio "$t.$k" "$(awk -v a="${R[shim.$t.${k}_ms]}" -v b="${R[local.$t.${k}_ms]}" \
                    'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
            done
            ratios+=("$t, shim + broker / local program: mean ${R[ratio.$t.mean]} (median ${R[ratio.$t.p50]}, p99 ${R[ratio.$t.p99]})")
        done
    fi
    {
        echo
        echo "tsung login storm: $USERS good + $BAD bad tokens at $RATE/s, $PASSES login(s) each, extauth_pool_size $POOL_SIZE, 2 nodes"
        head=$(printf '%-40s' "")
        for r in "${runs[@]}"; do head+=$(printf ' %20s' "$(label "$r")"); done
        echo "$head"
        for k in $(for t in "${transactions[@]}"; do printf "$t.%s " mean_ms p50_ms p90_ms p99_ms max_ms count; done) \
            connect.mean_ms connect.max_ms session.mean_ms session.max_ms \
            users_launched users_finished match nomatch tsung_errors \
            ejabberd.accepted ejabberd.failed ejabberd.node1.accepted ejabberd.node1.failed \
            ejabberd.node2.accepted ejabberd.node2.failed \
            broker.accepted broker.refused provider_calls mock_provider_calls loadavg; do
            row=$(printf '%-40s' "$k")
            for r in "${runs[@]}"; do row+=$(printf ' %20s' "${R[$r.$k]:-n/a}"); done
            echo "$row"
        done
        if [ ${#ratios[@]} -gt 0 ]; then
            echo
            printf '%s\n' "${ratios[@]}"
        fi
        echo "(times in ms, as tsung measures them: the SASL round trip through ejabberd and its extauth program;"
        echo " provider_calls: during the storm, from the broker's /metrics; mock_provider_calls: answered by"
        echo " the mock over the whole run, the 2 warm-up logins included)"
        echo
        if [ ${#FAILURES[@]} = 0 ]; then
            echo "checks: all counts agree ($((PASSES * USERS)) accepted, $((PASSES * BAD)) refused everywhere)"
        else
            echo "checks: ${#FAILURES[@]} FAILED"
            printf '  %s\n' "${FAILURES[@]}"
        fi
        echo "results: $OUT"
    } | tee "$OUT/report.txt"
}

write_summary() {
    local k
    {
        echo "users=$USERS"
        echo "bad=$BAD"
        echo "rate=$RATE"
        echo "pool_size=$POOL_SIZE"
        echo "passes=$PASSES"
        echo "runs=${RUNS[*]}"
        for k in "${KEYS[@]}"; do echo "$k=${R[$k]}"; done
        echo "failures=${#FAILURES[@]}"
        if [ ${#FAILURES[@]} = 0 ]; then echo "checks=ok"; else echo "checks=failed"; fi
    } >"$OUT/summary.env"
}

# ----- main -----

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCR=$(mktemp -d /tmp/extauth-tsung.XXXXXX)
# mktemp makes it 0700; user ejabberd must reach the node dirs, the binaries and the socket.
chmod 0755 "$SCR"
# The mock provider's client secret: this run only, passed by environment to the provider and
# the broker, never printed nor exported to anything else (ejabberd, the shims, tsung).
SECRET=$(random_hex 16)

mkdir -p "$SCR/bin"
for bin in extauth-shim extauth-load; do
    # Copies: user ejabberd runs them, and may not reach the build tree (/root/...).
    install -m 0755 "$BIN_DIR/$bin" "$SCR/bin/$bin"
done
say "scratch $SCR, results $OUT (uid of ejabberd: $EJ_UID)"

for r in "${RUNS[@]}"; do
    storm "$r"
done

if grep -rqF "$SECRET" "$OUT" 2>/dev/null; then
    fail "the mock provider's client secret appears in a log under $OUT"
fi
report
write_summary
say "done in $((SECONDS - T0)) s"
[ ${#FAILURES[@]} = 0 ]
