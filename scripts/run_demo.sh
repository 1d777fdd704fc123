#!/usr/bin/env bash
# `make run` without CONFIG: start the demo's device simulators (a serial MCU sending COBS frames
# with a noise rate, and Modbus TCP slaves serving an SDM120 energy meter and an XY-MD02 sensor),
# then the demo gateway. Ctrl-C stops the gateway cleanly; the simulators go with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SLUICE=.venv/bin/sluice
RUN_DIR=${SLUICE_DEMO_RUN:-.cache/demo}
mkdir -p "$RUN_DIR"
case "$RUN_DIR" in /*) ;; *) RUN_DIR=$PWD/$RUN_DIR ;; esac
export SLUICE_DEMO_SERIAL=${SLUICE_DEMO_SERIAL:-$RUN_DIR/mcu.pty}
export SLUICE_DEMO_MODBUS_PORT=${SLUICE_DEMO_MODBUS_PORT:-5020}

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$SLUICE" simulate serial --link "$SLUICE_DEMO_SERIAL" --interval 1 --noise 0.02 \
    --codec '{type: cobs, fields: [{name: flow, type: u16, scale: 0.1}, {name: pressure, type: i16, scale: 0.01}]}' \
    >"$RUN_DIR/serial-sim.log" 2>&1 &
pids+=($!)
"$SLUICE" simulate modbus --profile sdm120:1 --profile xy-md02:2 --port "$SLUICE_DEMO_MODBUS_PORT" \
    >"$RUN_DIR/modbus-sim.log" 2>&1 &
pids+=($!)
echo "demo simulators: serial MCU on $SLUICE_DEMO_SERIAL, Modbus TCP on 127.0.0.1:$SLUICE_DEMO_MODBUS_PORT" \
     "(logs in $RUN_DIR/)"
# not exec: the trap must outlive the gateway to stop the simulators
"$SLUICE" run "$@" || exit $?
