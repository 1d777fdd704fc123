#!/usr/bin/env bash
# Make sure Mosquitto is installed (through install_test_peers.sh), and with --start make sure a
# broker listens on 127.0.0.1:1883 for `make run`.
#
#   scripts/ensure_mosquitto.sh            install if missing (apt-get as root; otherwise say what to run)
#   scripts/ensure_mosquitto.sh --start    ... and start a local broker unless one already listens
#   scripts/ensure_mosquitto.sh --stop     stop the broker that --start started (if any)
#
# The broker started here is ours, not the distro's service: its config, persistence, pid file and
# log live in .cache/mosquitto/ of this checkout.
set -euo pipefail

HOST=127.0.0.1
PORT=1883
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="$ROOT/.cache/mosquitto"
CONF="$STATE_DIR/mosquitto.conf"
PID_FILE="$STATE_DIR/mosquitto.pid"
LOG_FILE="$STATE_DIR/mosquitto.log"

say() { echo "ensure_mosquitto: $*"; }

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

action=install
case "${1:-}" in
    "") ;;
    --start) action=start ;;
    --stop) action=stop ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

# mosquitto lives in /usr/sbin, which is not on a normal user's PATH.
find_bin() {
    local name=$1
    command -v "$name" 2>/dev/null && return 0
    local dir
    for dir in /usr/sbin /usr/local/sbin /usr/bin; do
        if [ -x "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
    done
    return 1
}

# The packages themselves come from the one list in install_test_peers.sh.
ensure_installed() {
    "$ROOT/scripts/install_test_peers.sh" run
}

# True when something accepts TCP connections on HOST:PORT.
listening() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

our_pid() {
    [ -s "$PID_FILE" ] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    grep -q mosquitto "/proc/$pid/comm" 2>/dev/null || return 1
    echo "$pid"
}

start_broker() {
    if listening; then
        if pid="$(our_pid)"; then
            say "using the broker this script started on $HOST:$PORT (pid $pid, log $LOG_FILE)"
        else
            say "something already listens on $HOST:$PORT; using it as the broker"
        fi
        return 0
    fi

    mkdir -p "$STATE_DIR"
    # Run as the current user: as root, mosquitto would otherwise switch to the 'mosquitto' user,
    # which cannot write into this checkout.
    cat >"$CONF" <<EOF
# Written by scripts/ensure_mosquitto.sh; rewritten on every start.
listener $PORT $HOST
allow_anonymous true
max_queued_messages 100000
max_inflight_messages 0
persistence true
persistence_location $STATE_DIR/
pid_file $PID_FILE
log_dest file $LOG_FILE
log_timestamp_format %Y-%m-%dT%H:%M:%S
user $(id -un)
EOF
    local bin
    bin="$(find_bin mosquitto)"
    rm -f "$PID_FILE"
    # Its stderr (startup warnings, config errors) goes to the log too, to keep this quiet.
    "$bin" -c "$CONF" -d 2>>"$LOG_FILE"
    local i
    for i in $(seq 50); do
        if listening; then
            say "started mosquitto on $HOST:$PORT (pid $(cat "$PID_FILE" 2>/dev/null || echo '?'), config $CONF, log $LOG_FILE)"
            return 0
        fi
        sleep 0.1
    done
    echo "ensure_mosquitto: mosquitto did not start listening on $HOST:$PORT within 5 s; its log:" >&2
    tail -n 20 "$LOG_FILE" >&2 2>/dev/null || true
    exit 1
}

stop_broker() {
    local pid
    if ! pid="$(our_pid)"; then
        rm -f "$PID_FILE"
        return 0
    fi
    kill "$pid"
    local i
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { say "stopped mosquitto (pid $pid)"; rm -f "$PID_FILE"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PID_FILE"
    say "mosquitto (pid $pid) did not stop within 5 s; killed it"
}

case $action in
    install) ensure_installed ;;
    start) ensure_installed; start_broker ;;
    stop) stop_broker ;;
esac
