#!/usr/bin/env bash
# manage_background_sync.sh - set up, test, demo, install and run the background-sync daemon.
#
# Run `./manage_background_sync.sh help` for the commands. Works from any directory: everything
# lives under the directory of this script (symlinks resolved).
#
# Two modes for the lifecycle commands (start, stop, restart, reload, status, logs, logs-follow,
# force, pause, resume), chosen on every call:
# - systemd: systemd is PID 1 (/run/systemd/system exists) and the unit is installed
#   (/etc/systemd/system/background-sync.service, by `install`): systemctl, journalctl and
#   systemd-run with the service's own user, state directory and env file;
# - self-managed otherwise, or with --no-systemd: the daemon runs from this project's .venv with a
#   PID file (var/run) and a log file (var/log).
set -Eeuo pipefail

PROG=$(basename -- "${BASH_SOURCE[0]}")
ROOT=$(cd -P -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)
VENV="$ROOT/.venv"
BIN="$VENV/bin/background-sync"
VAR_DIR="$ROOT/var"
RUN_DIR="$VAR_DIR/run"
LOG_DIR="$VAR_DIR/log"
PIDFILE="$RUN_DIR/background-sync.pid"
LOCKFILE="$RUN_DIR/background-sync.lock"
LOGFILE="$LOG_DIR/background-sync.log"
BACKEND_LOGFILE="$LOG_DIR/reference-backend.log"
SETUP_STAMP="$VENV/.background-sync-setup.sha256"
DEV_STAMP="$VENV/.background-sync-dev.sha256"
MIN_PYTHON_MAJOR=3
MIN_PYTHON_MINOR=11

# systemd mode: where `install` puts things. These paths are also written in
# systemd/background-sync.service; change them together.
SERVICE=background-sync
UNIT_SOURCE="$ROOT/systemd/background-sync.service"
ENV_EXAMPLE="$ROOT/systemd/background-sync.env.example"
PREFIX=/opt/background-sync
SERVICE_PYTHON="$PREFIX/.venv/bin/python"
CONF_DIR=/etc/background-sync
ENV_FILE="$CONF_DIR/background-sync.env"
TOKEN_FILE="$CONF_DIR/backend-token"
STATE_DIRS=(/var/lib/private/background-sync /var/lib/background-sync)
# Mode detection only; tests point these elsewhere. They change nothing that `install` writes.
SYSTEMD_DIR=${BACKGROUND_SYNC_SYSTEMD_DIR:-/run/systemd/system}
UNIT_FILE=${BACKGROUND_SYNC_UNIT_FILE:-/etc/systemd/system/$SERVICE.service}
NO_TOKEN_DROPIN="$UNIT_FILE.d/10-no-backend-token.conf"
# What `install` copies to $PREFIX (the code runs from the venv; the copy is for reference).
INSTALL_ITEMS=(daemon pyproject.toml requirements.txt README.md docs systemd manage_background_sync.sh)
# The build backend for `pip install --no-build-isolation` (setuptools >= 70.1 needs no `wheel`).
BUILD_REQUIREMENT='setuptools>=70.1'

MODE=selfmanaged   # or systemd: see select_mode
FORCE_SELFMANAGED=0 # --no-systemd

trap 'printf "%s: line %s: unexpected failure of: %s\n" "$PROG" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ----------------------------------------------------------------------------- helpers

usage() {
    cat <<EOF
Usage: $PROG [--no-systemd] COMMAND [ARGS...]

Setting up and trying out (this project's .venv):
  setup        create .venv (Python >= 3.11) and install requirements.txt + the project (editable)
  test [ARGS]  setup, install requirements-dev.txt, then run pytest from the project root;
               ARGS are passed to pytest
  demo         setup, migrate, seed demo users, start the reference backend and run the daemon
               in the foreground with console logs; Ctrl-C stops both
               (DEMO_USERS=25 DEMO_BACKEND_PORT=8000 DEMO_LATENCY_MS=100 DEMO_INTERVAL_SECONDS=30
                DEMO_STALE_AFTER_SECONDS=60; DEMO_ONCE=1 runs a single cycle and exits)

Installing as a systemd service (root; docs/operations.md):
  install [--token-file PATH] [--env-file PATH]
               copy the code to $PREFIX with its own virtualenv (system python3 >= 3.11,
               or PYTHON=...; WHEELHOUSE=DIR installs offline from DIR), the unit to
               $UNIT_FILE, the settings to $ENV_FILE (kept if present, replaced by
               --env-file), the backend token to $TOKEN_FILE (kept if present, replaced by
               --token-file); run the migrations as the service's user; enable the unit.
               Does not start a stopped service; restarts a running one if anything changed.
  uninstall [--purge]
               stop and disable the service, remove the unit and $PREFIX; --purge also
               removes $CONF_DIR and the state directory (the SQLite database)
  wheelhouse DIR
               download the wheels an offline install needs into DIR (network needed)

Running the daemon (systemd mode when the unit is installed and systemd runs, else self-managed):
  start        systemd: systemctl start (waits for READY=1); self-managed: start it detached
               (log: var/log/background-sync.log, PID file: var/run/background-sync.pid)
  stop         systemd: systemctl stop; self-managed: SIGTERM, then SIGKILL after STOP_TIMEOUT
               seconds (default 30)
  restart      stop, then start
  reload       systemd only: re-read $ENV_FILE (SIGHUP)
  status       exit 0 running, 1 failed or dead (PID file exists), 3 stopped
  logs         print the last LINES (default 100) lines of the daemon log (systemd: the journal)
  logs-follow  follow the daemon log
  force        make the running daemon start a sync cycle now (SIGUSR1)
  pause        persistently stop every instance from claiming users (survives restarts)
  resume       undo pause
  help         show this help

Options:
  --no-systemd self-managed mode even where the systemd unit is installed

Environment (self-managed): SYNC_DATABASE_URL (default sqlite:///\$ROOT/var/background-sync.db),
SYNC_BACKEND_URL, SYNC_LOG_FORMAT (json for the log file unless set), SYNC_INTERVAL_SECONDS,
SYNC_STATUS_ADDRESS, ...; PYTHON (default python3) for setup; START_WAIT_SECONDS (default 5) for
start. In systemd mode the settings are in $ENV_FILE.
EOF
}

info() { printf '%s\n' "$*"; }
warn() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 1
}

# require_number NAME VALUE: VALUE must be a non-negative number (decimals allowed).
require_number() {
    [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1 must be a number, got '$2'"
}

require_int() {
    [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
}

# to_ms SECONDS -> milliseconds (integer)
to_ms() {
    local whole=${1%%.*} frac=0
    [[ $1 == *.* ]] && frac=${1#*.}
    frac="${frac}000"
    printf '%d\n' "$((10#$whole * 1000 + 10#${frac:0:3}))"
}

now_ms() {
    local t
    t=$(date +%s%N)
    printf '%d\n' "$((t / 1000000))"
}

# format_ms MS -> "1.2s"
format_ms() {
    printf '%d.%01ds\n' "$(($1 / 1000))" "$((($1 % 1000) / 100))"
}

sha256_of() {
    cat -- "$@" | sha256sum | cut -d' ' -f1
}

export_database_default() {
    if [[ -z ${SYNC_DATABASE_URL:-} ]]; then
        mkdir -p "$VAR_DIR"
        export SYNC_DATABASE_URL="sqlite:///$VAR_DIR/background-sync.db"
    fi
}

require_installed() {
    [[ -x $BIN ]] || die "$BIN is missing: run ./$PROG setup first"
}

# proc_alive PID: the process exists and is not a zombie.
proc_alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $state && $state != Z* ]]
}

# pid_is_ours PID: PID is a running `background-sync run` / `python -m daemon run`.
pid_is_ours() {
    local pid=$1 cmdline
    [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *background-sync* || $cmdline == *daemon* ]] || return 1
    [[ " $cmdline " == *" run "* ]]
}

# read_pidfile: prints the PID file's content (first line); fails if there is no PID file.
read_pidfile() {
    local pid=""
    [[ -f $PIDFILE ]] || return 1
    IFS= read -r pid <"$PIDFILE" || true
    printf '%s\n' "$pid"
}

# running_pid: prints the PID of our running daemon; fails if it is not running.
running_pid() {
    local pid
    pid=$(read_pidfile) || return 1
    pid_is_ours "$pid" || return 1
    printf '%s\n' "$pid"
}

# clean_stale_pidfile: removes a PID file whose process is gone or is not ours.
clean_stale_pidfile() {
    local pid
    pid=$(read_pidfile) || return 0
    if ! pid_is_ours "$pid"; then
        info "removing stale PID file $PIDFILE (pid '${pid}' is not a running background-sync)"
        rm -f -- "$PIDFILE"
    fi
}

LOCK_HELD=0
# acquire_lock: serialises start/stop/restart between concurrent invocations (fd 9).
acquire_lock() {
    ((LOCK_HELD)) && return 0
    mkdir -p "$RUN_DIR"
    exec 9>>"$LOCKFILE"
    local wait_s
    wait_s=$(($(to_ms "${STOP_TIMEOUT:-30}") / 1000 + 30))
    flock -w "$wait_s" 9 || die "another $PROG start/stop is still running (lock $LOCKFILE held for ${wait_s}s)"
    LOCK_HELD=1
}

# http_ok URL: the URL answers with a 2xx status within a second.
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 1 -- "$1" >/dev/null 2>&1
    else
        "$VENV/bin/python" - "$1" >/dev/null 2>&1 <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1) as response:
    sys.exit(0 if 200 <= response.status < 300 else 1)
PY
    fi
}

# ----------------------------------------------------------------------------- setup / test

# python_version PYTHON -> "3.11"
python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

python_is_recent() {
    local major=${1%%.*} minor=${1#*.}
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
    ((major > MIN_PYTHON_MAJOR || (major == MIN_PYTHON_MAJOR && minor >= MIN_PYTHON_MINOR)))
}

ensure_venv() {
    local version
    if [[ -x $VENV/bin/python ]]; then
        if version=$(python_version "$VENV/bin/python") && python_is_recent "$version"; then
            return 0
        fi
        warn "$VENV is broken or has Python '${version:-?}' (< $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR): recreating it"
        rm -rf -- "$VENV"
    fi
    local python=${PYTHON:-python3}
    command -v -- "$python" >/dev/null 2>&1 ||
        die "Python interpreter '$python' not found: install Python >= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR or set PYTHON=/path/to/python3.11"
    version=$(python_version "$python") || die "'$python' does not run as a Python interpreter (set PYTHON=/path/to/python3.11)"
    python_is_recent "$version" ||
        die "'$python' is Python $version; background-sync needs Python >= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR (set PYTHON=/path/to/python3.11)"
    info "creating virtualenv $VENV with $python (Python $version)"
    "$python" -m venv "$VENV" ||
        die "could not create $VENV with '$python' (on Debian/Ubuntu: apt-get install python3-venv)"
}

pip_install() {
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet "$@"
}

cmd_setup() {
    [[ -f $ROOT/requirements.txt && -f $ROOT/pyproject.toml ]] ||
        die "requirements.txt or pyproject.toml missing in $ROOT"
    mkdir -p "$RUN_DIR"
    exec 8>>"$RUN_DIR/setup.lock"
    flock -w 600 8 || die "another setup is still running (lock $RUN_DIR/setup.lock)"
    ensure_venv
    local want have=""
    want=$(sha256_of "$ROOT/requirements.txt" "$ROOT/pyproject.toml")
    [[ -f $SETUP_STAMP ]] && IFS= read -r have <"$SETUP_STAMP"
    if [[ $want == "$have" && -x $BIN ]]; then
        info "setup: $VENV is up to date (background-sync: $BIN)"
    else
        info "setup: installing requirements.txt and background-sync into $VENV"
        rm -f -- "$SETUP_STAMP" "$DEV_STAMP"
        pip_install --upgrade pip
        pip_install -r "$ROOT/requirements.txt"
        pip_install --no-deps -e "$ROOT"
        [[ -x $BIN ]] || die "pip did not install $BIN"
        printf '%s\n' "$want" >"$SETUP_STAMP"
        info "setup: installed background-sync into $VENV (command: $BIN)"
    fi
    exec 8>&-
}

cmd_test() {
    cmd_setup
    [[ -f $ROOT/requirements-dev.txt ]] || die "requirements-dev.txt missing in $ROOT"
    local want have=""
    want=$(sha256_of "$ROOT/requirements-dev.txt" "$ROOT/requirements.txt" "$ROOT/pyproject.toml")
    [[ -f $DEV_STAMP ]] && IFS= read -r have <"$DEV_STAMP"
    if [[ $want != "$have" ]]; then
        info "test: installing requirements-dev.txt into $VENV"
        pip_install -r "$ROOT/requirements-dev.txt"
        printf '%s\n' "$want" >"$DEV_STAMP"
    fi
    cd -- "$ROOT"
    exec "$VENV/bin/python" -m pytest "$@"
}

# ----------------------------------------------------------------------------- demo

DEMO_BACKEND_PID=""

demo_stop_backend() {
    local pid=$DEMO_BACKEND_PID i
    [[ -n $pid ]] || return 0
    DEMO_BACKEND_PID=""
    if proc_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" || break
            sleep 0.1
        done
        if proc_alive "$pid"; then
            warn "reference backend (pid $pid) ignored SIGTERM: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    info "demo: stopped the reference backend (pid $pid)"
}

demo_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    demo_stop_backend
    exit "$rc"
}

cmd_demo() {
    local users=${DEMO_USERS:-25} port=${DEMO_BACKEND_PORT:-8000} latency=${DEMO_LATENCY_MS:-100}
    local interval=${DEMO_INTERVAL_SECONDS:-30} stale=${DEMO_STALE_AFTER_SECONDS:-60}
    require_int DEMO_USERS "$users"
    require_int DEMO_BACKEND_PORT "$port"
    require_int DEMO_LATENCY_MS "$latency"
    require_number DEMO_INTERVAL_SECONDS "$interval"
    require_number DEMO_STALE_AFTER_SECONDS "$stale"

    cmd_setup
    mkdir -p "$VAR_DIR" "$LOG_DIR"
    export_database_default
    local pid
    if pid=$(running_pid); then
        warn "note: the background daemon (pid $pid) is also running; both will sync the same database"
    fi
    local health="http://127.0.0.1:$port/health"
    if http_ok "$health"; then
        die "something already answers on $health: stop it or choose another port with DEMO_BACKEND_PORT"
    fi

    export SYNC_LOG_FORMAT=console
    info "demo: database $SYNC_DATABASE_URL"
    "$BIN" migrate || die "'background-sync migrate' failed (exit status $?)"
    "$BIN" seed-demo --users "$users" || die "'background-sync seed-demo --users $users' failed (exit status $?)"

    local backend_log_offset=0
    [[ -f $BACKEND_LOGFILE ]] && backend_log_offset=$(stat -c %s -- "$BACKEND_LOGFILE")
    trap demo_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    "$BIN" reference-backend --host 127.0.0.1 --port "$port" --latency-ms "$latency" \
        >>"$BACKEND_LOGFILE" 2>&1 </dev/null &
    DEMO_BACKEND_PID=$!
    info "demo: reference backend starting on 127.0.0.1:$port (pid $DEMO_BACKEND_PID, log $BACKEND_LOGFILE)"
    local ready=0 deadline
    deadline=$(($(now_ms) + 10000))
    while (($(now_ms) < deadline)); do
        if http_ok "$health"; then
            ready=1
            break
        fi
        if ! proc_alive "$DEMO_BACKEND_PID"; then
            tail -c "+$((backend_log_offset + 1))" -- "$BACKEND_LOGFILE" 2>/dev/null | tail -n 20 >&2 || true
            die "the reference backend exited before answering on $health (its log: $BACKEND_LOGFILE)"
        fi
        sleep 0.1
    done
    ((ready)) || die "the reference backend did not answer on $health within 10s (see $BACKEND_LOGFILE)"

    export SYNC_INTERVAL_SECONDS="$interval"
    export SYNC_BACKEND_URL="http://127.0.0.1:$port/api/v1/sync/start"
    export SYNC_STALE_AFTER_SECONDS="$stale"
    local rc=0
    if [[ ${DEMO_ONCE:-0} == 1 ]]; then
        info "demo: running one sync cycle against $SYNC_BACKEND_URL"
        "$BIN" once || rc=$?
    else
        info "demo: running the daemon against $SYNC_BACKEND_URL every ${interval}s (Ctrl-C stops)"
        "$BIN" run || rc=$?
    fi
    exit "$rc"
}

# ----------------------------------------------------------------------------- self-managed lifecycle

selfmanaged_start() {
    require_installed
    acquire_lock
    local pid
    if pid=$(running_pid); then
        info "background-sync is already running (pid $pid); not starting another"
        return 0
    fi
    clean_stale_pidfile
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    export_database_default
    export SYNC_LOG_FORMAT="${SYNC_LOG_FORMAT:-json}"
    local wait_s=${START_WAIT_SECONDS:-5}
    require_number START_WAIT_SECONDS "$wait_s"

    local log_offset=0
    [[ -f $LOGFILE ]] && log_offset=$(stat -c %s -- "$LOGFILE")
    # Job control is off in a script, so $! is the daemon itself: setsid execs without forking.
    # fd 9 (the lock) is closed so that the daemon does not hold the lock while it runs.
    setsid nohup "$BIN" run >>"$LOGFILE" 2>&1 </dev/null 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE.tmp"
    mv -f -- "$PIDFILE.tmp" "$PIDFILE"

    local deadline
    deadline=$(($(now_ms) + $(to_ms "$wait_s")))
    while proc_alive "$pid" && (($(now_ms) < deadline)); do
        sleep 0.1
    done
    if ! proc_alive "$pid" || ! pid_is_ours "$pid"; then
        rm -f -- "$PIDFILE"
        if proc_alive "$pid"; then # alive but not the daemon: never leave it behind
            kill -KILL "$pid" 2>/dev/null || true
        fi
        local rc=""
        wait "$pid" 2>/dev/null || rc=$?
        warn "background-sync exited during startup${rc:+ (exit status $rc)}; last lines of $LOGFILE:"
        tail -c "+$((log_offset + 1))" -- "$LOGFILE" 2>/dev/null | tail -n 20 >&2 || true
        exit 1
    fi
    info "started background-sync (pid $pid); log: $LOGFILE"
}

selfmanaged_stop() {
    acquire_lock
    local pid
    if ! pid=$(running_pid); then
        clean_stale_pidfile
        info "background-sync is not running"
        return 0
    fi
    local timeout=${STOP_TIMEOUT:-30}
    require_number STOP_TIMEOUT "$timeout"
    local started deadline
    started=$(now_ms)
    deadline=$((started + $(to_ms "$timeout")))
    info "stopping background-sync (pid $pid, up to ${timeout}s)..."
    kill -TERM "$pid" 2>/dev/null || true
    while proc_alive "$pid" && (($(now_ms) < deadline)); do
        sleep 0.1
    done
    if proc_alive "$pid"; then
        warn "background-sync (pid $pid) did not stop within ${timeout}s: sending SIGKILL to its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" || break
            sleep 0.1
        done
        if proc_alive "$pid"; then
            die "background-sync (pid $pid) survived SIGKILL"
        fi
    fi
    rm -f -- "$PIDFILE"
    info "stopped background-sync (pid $pid) in $(format_ms $(($(now_ms) - started)))"
}

selfmanaged_restart() {
    acquire_lock
    selfmanaged_stop
    selfmanaged_start
}

selfmanaged_status() {
    local pid
    if ! pid=$(read_pidfile); then
        info "background-sync is stopped"
        exit 3
    fi
    if ! pid_is_ours "$pid"; then
        info "background-sync is dead but its PID file exists ($PIDFILE, pid '${pid}')"
        exit 1
    fi
    local uptime
    uptime=$(ps -o etime= -p "$pid" 2>/dev/null || true)
    uptime=${uptime//[[:space:]]/}
    info "background-sync is running (pid $pid, up ${uptime:-?})"
    if [[ -x $BIN ]]; then
        export_database_default
        timeout 15 "$BIN" status || true
    fi
    exit 0
}

selfmanaged_force() {
    local pid
    pid=$(running_pid) || die "background-sync is not running: nothing to force"
    kill -USR1 "$pid"
    info "sent SIGUSR1 to background-sync (pid $pid): a sync cycle starts now"
}

selfmanaged_reload() {
    die "reload needs the systemd unit (the self-managed daemon reads no env file): use restart"
}

selfmanaged_logs() {
    local lines=${LINES:-100}
    require_int LINES "$lines"
    [[ -f $LOGFILE ]] || die "no log yet: $LOGFILE does not exist (start the daemon first)"
    tail -n "$lines" -- "$LOGFILE"
}

selfmanaged_logs_follow() {
    local lines=${LINES:-100}
    require_int LINES "$lines"
    [[ -f $LOGFILE ]] || warn "no log yet: waiting for $LOGFILE to appear"
    exec tail -n "$lines" -F -- "$LOGFILE"
}

# pause/resume: a flag in the database, obeyed by every instance that shares it.
selfmanaged_pause() {
    require_installed
    export_database_default
    "$BIN" pause || die "'background-sync pause' failed (exit status $?)"
}

selfmanaged_resume() {
    require_installed
    export_database_default
    "$BIN" resume || die "'background-sync resume' failed (exit status $?)"
}

@@SYSTEMD@@
# ----------------------------------------------------------------------------- main

main() {
    while (($# > 0)); do
        case $1 in
        --no-systemd) shift ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            break
            ;;
        -*)
            warn "unknown option: $1"
            usage >&2
            exit 2
            ;;
        *) break ;;
        esac
    done
    if (($# == 0)); then
        warn "missing command"
        usage >&2
        exit 2
    fi
    local command=$1
    shift
    cd -- "$ROOT"
    case $command in
    setup) cmd_setup ;;
    test) cmd_test "$@" ;;
    demo) cmd_demo ;;
    start | stop | restart | status | force) "${MODE}_${command}" ;;
    logs) cmd_logs ;;
    logs-follow) cmd_logs_follow ;;
    help) usage ;;
    *)
        warn "unknown command: $command"
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
