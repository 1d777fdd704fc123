#!/usr/bin/env bash
# Install the system packages that `make deps` and `make test` need on a Debian machine: the one
# list below. `make deps`, `make test`, `make run`/`make bench` (through ensure_mosquitto.sh) and
# CI's .ci/run all come through here, so CI fails whenever the README's commands would.
#
#   scripts/install_test_peers.sh [--check] [GROUP]   install what GROUP needs and is missing
#   scripts/install_test_peers.sh --list [GROUP]      print GROUP's apt packages, one a line
#
# GROUP is deps, test or run (default: every group). As root, missing packages are installed with
# apt-get; otherwise (or with --check) the script prints the exact apt-get command and exits 1
# when a required package is missing (0 when only optional ones are).
set -euo pipefail

# The list. To add a peer, add one line.
#   package   the Debian package to install
#   found-by  a command on PATH (or in /usr/sbin, /usr/local/sbin) that proves it is installed,
#             or python3:MODULE for a module of the system Python
#   groups    the make targets that need it, comma-separated: deps, test, run
#   need      required, or optional (installed as root, never a failure when missing)
peer_table() {
    cat <<'EOF'
# package               found-by               groups          need       why
cmake                   cmake                  deps            required   pip compiles llama-cpp-python from source
g++                     g++                    deps            required   ... with a C++ compiler
make                    make                   deps            required   ... driven by make (and the Makefile itself)
python3-venv            python3:ensurepip      deps            required   `make deps` creates .venv with python3 -m venv
mosquitto               mosquitto              test,run        required   the MQTT broker the tests start (tests/conftest.py) and `make run` uses
mosquitto-clients       mosquitto_pub          test,run        optional   mosquitto_pub/sub, for poking at a broker by hand
socat                   socat                  test,run        optional   links two ptys, for trying a serial device by hand
chromium                chromium               test            required   tests/web/test_browser.py drives the console in it through Playwright
systemd                 systemd-analyze        test            required   tests/test_install.py checks the generated unit with systemd-analyze verify
redis-server            redis-server           test            required   the Redis the redis/redis_out node tests start (tests/nodes/conftest.py)
openjdk-17-jre-headless java                   test            required   PyFlink's mini-cluster runs the job `sluice export flink` writes (tests/gateway/test_export_flink.py)
faketime                faketime               test            required   tests/gateway/test_clock_steps.py steps the wall clock of a gateway under libfaketime
EOF
}

say() { echo "install_test_peers: $*"; }

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

mode=install
group=all
while [ $# -gt 0 ]; do
    case $1 in
        --check) mode=check ;;
        --list) mode=list ;;
        -h | --help) usage; exit 0 ;;
        deps | test | run | all) group=$1 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

# Rows of the table for $group: "package found-by need".
rows() {
    local pkg found groups need _why
    while read -r pkg found groups need _why; do
        case $pkg in '' | '#'*) continue ;; esac
        if [ "$group" = all ] || [[ ",$groups," == *",$group,"* ]]; then
            echo "$pkg $found $need"
        fi
    done < <(peer_table)
}

present() {
    local found=$1
    case $found in
        python3:*) python3 -c "import ${found#python3:}" >/dev/null 2>&1 ;;
        *)
            command -v "$found" >/dev/null 2>&1 && return 0
            # mosquitto lives in /usr/sbin, which is not on a normal user's PATH.
            local dir
            for dir in /usr/sbin /usr/local/sbin; do
                [ -x "$dir/$found" ] && return 0
            done
            return 1
            ;;
    esac
}

if [ "$mode" = list ]; then
    rows | while read -r pkg _found _need; do echo "$pkg"; done
    exit 0
fi

missing_required=()
missing_optional=()
check_all() {
    missing_required=()
    missing_optional=()
    local pkg found need
    while read -r pkg found need; do
        present "$found" && continue
        if [ "$need" = required ]; then missing_required+=("$pkg"); else missing_optional+=("$pkg"); fi
    done < <(rows)
}

check_all
[ ${#missing_required[@]} -eq 0 ] && [ ${#missing_optional[@]} -eq 0 ] && exit 0

if [ "$mode" = install ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    pkgs=("${missing_required[@]}" "${missing_optional[@]}")
    say "installing ${pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt-get (a second checkout running this at the same time) instead of failing.
    apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
    "${apt[@]}" update
    "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >/dev/null
    check_all
    if [ ${#missing_required[@]} -gt 0 ]; then
        echo "install_test_peers: apt-get finished but these are still not found: ${missing_required[*]}" >&2
        exit 1
    fi
    exit 0
fi

if [ ${#missing_required[@]} -eq 0 ]; then
    say "optional, not installed: ${missing_optional[*]} (sudo apt-get install ${missing_optional[*]})"
    exit 0
fi
{
    echo "install_test_peers: missing: ${missing_required[*]}"
    echo "Install them (as root this script does it), then run this again:"
    echo "    sudo apt-get install --no-install-recommends ${missing_required[*]}${missing_optional[*]:+ ${missing_optional[*]}}"
} >&2
exit 1
