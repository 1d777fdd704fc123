#!/usr/bin/env bash
# Install Sluice on a gateway as a systemd service, upgrade it in place, or remove it.
#
#   sudo scripts/install.sh                       install or upgrade from this checkout
#   sudo scripts/install.sh --wheelhouse DIR      the same with no network, from a folder of wheels
#   scripts/install.sh --download DIR             build that folder (on a machine of the gateway's
#                                                 CPU architecture, with network)
#   sudo scripts/install.sh --uninstall [--purge] remove the service and code (--purge: also the
#                                                 config, data and the sluice user)
#   --no-backup                                   upgrade without the backup taken before it
#
# A shell script rather than a `sluice install` command: it runs before any Python environment
# exists, and the same file installs from a checkout or from a copied folder of wheels.
#
# Where things go: code in /opt/sluice (a venv per installed version, /opt/sluice/venv points at
# the current one), config in /etc/sluice, data in /var/lib/sluice, the unit in
# /etc/systemd/system/sluice.service. Running it twice changes nothing; an upgrade first takes a
# `sluice backup` with the installed version into /var/backups/sluice (the last three are kept),
# and one whose new version fails its start check is rolled back to the previous venv.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""            # --root: install under this prefix (tests); never touches systemctl
WHEELHOUSE=""
DOWNLOAD=""
EXTRAS=""
SVC_USER=sluice
PYTHON=${PYTHON:-python3}
START=1
ACTION=install
PURGE=0
BACKUP=1
KEEP_BACKUPS=3
ARCHIVE=""

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { echo "sluice install: $*"; }
die() { echo "sluice install: ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2%/}; shift ;;
        --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd) || die "no wheelhouse folder $2"; shift ;;
        --download) DOWNLOAD=$2; shift ;;
        --extras) EXTRAS=$2; shift ;;
        --user) SVC_USER=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --no-start) START=0 ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=1 ;;
        --no-backup) BACKUP=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

PREFIX=$ROOT/opt/sluice
CONFDIR=$ROOT/etc/sluice
CONFIG=$CONFDIR/config.yaml
DATA=$ROOT/var/lib/sluice
UNIT=$ROOT/etc/systemd/system/sluice.service
BACKUPS=$ROOT/var/backups/sluice
SPEC="sluice-gateway${EXTRAS:+[$EXTRAS]}"

systemd_here() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# --- build a wheelhouse (no root needed) ---------------------------------------------------------
if [ -n "$DOWNLOAD" ]; then
    mkdir -p "$DOWNLOAD"
    say "building wheels of $SPEC and every dependency into $DOWNLOAD for $(uname -m)"
    say "(llama-cpp-python, with --extras llm, compiles once here: minutes on a Pi)"
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$DOWNLOAD" "$SRC${EXTRAS:+[$EXTRAS]}"
    # pip and setuptools too, so a venv can be brought up to date offline
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$DOWNLOAD" pip setuptools wheel
    echo "$EXTRAS" >"$DOWNLOAD/EXTRAS"
    say "done: $(find "$DOWNLOAD" -name '*.whl' | wc -l) wheels; copy the folder to the gateway and run"
    say "  sudo scripts/install.sh --wheelhouse FOLDER"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*): it creates a system user and a service"

# --- uninstall ------------------------------------------------------------------------------------
if [ "$ACTION" = uninstall ]; then
    if systemd_here; then
        systemctl disable --now sluice.service 2>/dev/null || true
    fi
    rm -f "$UNIT"
    systemd_here && systemctl daemon-reload || true
    rm -rf "$PREFIX"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$CONFDIR" "$DATA"
        if getent passwd "$SVC_USER" >/dev/null; then userdel "$SVC_USER" 2>/dev/null || true; fi
        say "removed the service, the code, the config ($CONFDIR), the data ($DATA) and user $SVC_USER"
    else
        say "removed the service and the code; kept the config ($CONFDIR), the data ($DATA) and user"
        say "$SVC_USER (--purge removes them too)"
    fi
    [ -d "$BACKUPS" ] && say "kept the backups taken before upgrades in $BACKUPS"
    exit 0
fi

# --- install or upgrade -----------------------------------------------------------------------------
"$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || die "$PYTHON must be Python 3.11 or newer with venv and ensurepip (Debian: apt-get install python3-venv)"

if [ -n "$WHEELHOUSE" ]; then
    compgen -G "$WHEELHOUSE/sluice_gateway-*.whl" >/dev/null || die "$WHEELHOUSE holds no sluice_gateway wheel"
    [ -z "$EXTRAS" ] && [ -f "$WHEELHOUSE/EXTRAS" ] && EXTRAS=$(cat "$WHEELHOUSE/EXTRAS") && SPEC="sluice-gateway${EXTRAS:+[$EXTRAS]}"
    # what is installed is named by the wheels themselves
    STAMP=$( (cd "$WHEELHOUSE" && sha256sum -- *.whl; echo "$EXTRAS") | sha256sum | cut -c1-16)
else
    [ -f "$SRC/pyproject.toml" ] || die "no pyproject.toml in $SRC: run from a Sluice checkout, or use --wheelhouse"
    STAMP=$( (cd "$SRC" && find pyproject.toml gateway nodes firmware_bridges config -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; echo "$EXTRAS") \
        | sha256sum | cut -c1-16)
fi
STAMP="$STAMP-$("$PYTHON" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"

# the service user, in dialout for serial ports
if ! getent passwd "$SVC_USER" >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/sluice --no-create-home \
        --shell /usr/sbin/nologin --comment "Sluice gateway" "$SVC_USER"
    say "created system user $SVC_USER"
fi
if getent group dialout >/dev/null && ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx dialout; then
    usermod -a -G dialout "$SVC_USER"
    say "added $SVC_USER to dialout (serial ports)"
fi

# Config: root owns the folder and the file, group sluice may read them. The folder is group-
# writable and setgid so the console can save the config by writing a new file beside it and
# renaming it over the old one (the file keeps mode 0640, group sluice).
install -d -m 0755 "$PREFIX" "$PREFIX/venvs" "$(dirname "$UNIT")"
install -d -m 2770 -o root -g "$SVC_USER" "$CONFDIR"
install -d -m 0750 -o "$SVC_USER" -g "$SVC_USER" "$DATA"
if [ ! -e "$CONFIG" ]; then
    sed -e "s|@DATA@|$DATA|g" -e "s|@GATEWAY_ID@|$(hostname -s | tr -c 'A-Za-z0-9_\n-' '-' | cut -c1-60)|g" \
        "$SRC/scripts/install/config.yaml" >"$CONFIG.new" 2>/dev/null \
        || printf 'gateway: {id: gateway, data_dir: %s}\npipelines: []\n' "$DATA" >"$CONFIG.new"
    chown root:"$SVC_USER" "$CONFIG.new" && chmod 0640 "$CONFIG.new" && mv "$CONFIG.new" "$CONFIG"
    say "wrote a starting config to $CONFIG"
fi
if [ ! -e "$CONFDIR/environment" ]; then
    install -m 0640 -o root -g "$SVC_USER" /dev/null "$CONFDIR/environment"
fi

VENV=$PREFIX/venvs/$STAMP
CURRENT=$(readlink "$PREFIX/venv" 2>/dev/null || true)
if [ "$CURRENT" = "venvs/$STAMP" ] && [ -x "$VENV/bin/sluice" ]; then
    say "this version is already installed ($STAMP): nothing to install"
    CHANGED=0
else
    rm -rf "$VENV"
    say "creating $VENV and installing $SPEC${WHEELHOUSE:+ from $WHEELHOUSE (offline)}"
    "$PYTHON" -m venv "$VENV"
    if [ -n "$WHEELHOUSE" ]; then
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$WHEELHOUSE" "$SPEC"
    else
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$SRC${EXTRAS:+[$EXTRAS]}"
    fi
    # the start check: the new code must read the config it is going to run
    if ! "$VENV/bin/sluice" validate "$CONFIG"; then
        rm -rf "$VENV"
        die "the new version does not accept $CONFIG (above); nothing was changed"
    fi
    # The way back from an upgrade: a backup taken by the installed version (which an older
    # `sluice restore` accepts) just before the switch. The service keeps running meanwhile (SQLite's
    # online backup); what it writes until the restart is not in it.
    OLD_SLUICE=$PREFIX/$CURRENT/bin/sluice
    if [ -n "$CURRENT" ] && [ -x "$OLD_SLUICE" ]; then
        if [ "$BACKUP" -eq 0 ]; then
            say "no backup before this upgrade (--no-backup)"
        else
            mkdir -p "$(dirname "$BACKUPS")"  # /var/backups: Debian's own, left as it is
            install -d -m 0700 "$BACKUPS"
            ARCHIVE=$BACKUPS/sluice-$(date -u +%Y%m%d-%H%M%S)-before-upgrade.tar.gz
            if taken=$("$OLD_SLUICE" backup "$CONFIG" -o "$ARCHIVE" 2>&1); then
                say "took a backup before the upgrade: $ARCHIVE"
                say "  (the way back: docs/install.md, Downgrade; sluice restore $ARCHIVE --force)"
                # keep the last few: each holds every database
                find "$BACKUPS" -maxdepth 1 -name 'sluice-*-before-upgrade.tar.gz' | sort -r \
                    | tail -n +$((KEEP_BACKUPS + 1)) | xargs -r rm -f --
            elif [[ $taken == *"nothing to back up"* ]]; then
                say "no backup before the upgrade: ${taken#sluice backup: }"
            else
                rm -rf "$VENV" "$ARCHIVE.part"
                die "could not take a backup before the upgrade (below); nothing was changed" \
                    "(--no-backup upgrades without one):"$'\n'"$taken"
            fi
        fi
    fi
    ln -sfn "venvs/$STAMP" "$PREFIX/venv.next" && mv -T "$PREFIX/venv.next" "$PREFIX/venv"
    CHANGED=1
    say "installed $("$VENV/bin/sluice" --version) in $VENV"
fi

tmp_unit=$(mktemp)
sed -e "s|@USER@|$SVC_USER|g" -e "s|@VENV@|${PREFIX#"$ROOT"}/venv|g" -e "s|@CONFIG@|${CONFIG#"$ROOT"}|g" \
    -e "s|@CONFDIR@|${CONFDIR#"$ROOT"}|g" -e "s|@DATA@|${DATA#"$ROOT"}|g" "$SRC/scripts/install/sluice.service" >"$tmp_unit"
if ! cmp -s "$tmp_unit" "$UNIT"; then
    install -m 0644 "$tmp_unit" "$UNIT"
    say "wrote $UNIT"
    CHANGED=1
fi
rm -f "$tmp_unit"

if systemd_here; then
    systemctl daemon-reload
    systemctl enable --quiet sluice.service
    if [ "$START" -eq 1 ] && { [ "$CHANGED" -eq 1 ] || ! systemctl is-active --quiet sluice.service; }; then
        # Type=notify: restart returns once the gateway said READY=1, or fails
        if ! systemctl restart sluice.service; then
            if [ -n "$CURRENT" ] && [ "$CURRENT" != "venvs/$STAMP" ] && [ -d "$PREFIX/$CURRENT" ]; then
                ln -sfn "$CURRENT" "$PREFIX/venv.next" && mv -T "$PREFIX/venv.next" "$PREFIX/venv"
                if ! systemctl restart sluice.service; then
                    # the new version may have upgraded a database before it failed: the old one refuses it
                    die "the new version did not start, and neither does $CURRENT after the roll-back" \
                        "(journalctl -u sluice): if a database is newer than it knows, restore the backup" \
                        "taken before the upgrade${ARCHIVE:+ ($ARCHIVE)} (docs/install.md, Downgrade) or fix" \
                        "the new version's start"
                fi
                die "the new version did not start (journalctl -u sluice); rolled back to $CURRENT"
            fi
            die "the service did not start: journalctl -u sluice -n 50 says why"
        fi
    fi
else
    say "systemd is not running here${ROOT:+ (--root)}: enable the service at boot with"
    say "  systemctl enable --now sluice"
fi

# keep the current venv and the one before it (for a rollback by hand); remove older ones
keep_prev=${CURRENT#venvs/}
for d in "$PREFIX"/venvs/*; do
    [ -d "$d" ] || continue
    case "$(basename "$d")" in "$STAMP" | "$keep_prev") ;; *) rm -rf "$d" ;; esac
done

cat <<EOF

Sluice is installed.
  config     $CONFIG   (secrets: $CONFDIR/environment)
  data       $DATA
  code       $PREFIX/venv -> $(readlink "$PREFIX/venv")
  service    systemctl status sluice   ·   logs: journalctl -u sluice -f
  console    http://127.0.0.1:8080/ on the gateway (console: in the config; the first visit needs
             the setup code the log prints: journalctl -u sluice | grep 'setup code')
  check      sudo -u $SVC_USER $PREFIX/venv/bin/sluice doctor $CONFIG
EOF
