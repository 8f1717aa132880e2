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
LOGFILE="$LOG_DIR/background-sync.log"     # the daemon's stdout: JSON lines only
ERRFILE="$LOG_DIR/background-sync.stderr"  # its stderr: a failed start's one line, a traceback
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
PGPASS_FILE="$CONF_DIR/pgpass" # optional (docs/operations.md, Secrets)
STATE_DIRS=(/var/lib/private/background-sync /var/lib/background-sync)
# Mode detection only; tests point these elsewhere. They change nothing that `install` writes.
SYSTEMD_DIR=${BACKGROUND_SYNC_SYSTEMD_DIR:-/run/systemd/system}
UNIT_FILE=${BACKGROUND_SYNC_UNIT_FILE:-/etc/systemd/system/$SERVICE.service}
NO_TOKEN_DROPIN="$UNIT_FILE.d/10-no-backend-token.conf"
# What `install` copies to $PREFIX (the code runs from the venv; the copy is for reference).
INSTALL_ITEMS=(daemon pyproject.toml requirements.txt README.md docs systemd manage_background_sync.sh)
# The build backend (pyproject.toml), for `wheelhouse`.
BUILD_REQUIREMENT='setuptools>=68'

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
               fetch and build the wheels an offline install needs into DIR (needs the index)

Running the daemon (systemd mode when the unit is installed and systemd runs, else self-managed):
  start        systemd: systemctl start (waits for READY=1); self-managed: start it detached
               (log: var/log/background-sync.log, JSON lines; stderr: var/log/background-sync.stderr;
               PID file: var/run/background-sync.pid)
  stop         systemd: systemctl stop; self-managed: SIGTERM, then SIGKILL after STOP_TIMEOUT
               seconds (default 30)
  restart      stop, then start
  reload       systemd only: re-read $ENV_FILE (SIGHUP)
  status       exit 0 running, 1 failed or dead (PID file exists), 3 stopped
  logs         print the last LINES (default 100) lines of the daemon log (systemd: the journal);
               on a terminal through 'background-sync logs' (short form), else as written
  logs-follow  follow the daemon log (the same way)
  force        make the running daemon start a sync cycle now (SIGUSR1)
  pause        persistently stop every instance from claiming users (survives restarts)
  resume       undo pause
  mode         print which of the two modes the commands above use, and why
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

# log_viewer: the `background-sync` that prints log lines for people (its `logs` command): the
# installed service's in systemd mode, else this checkout's. Fails when there is none.
log_viewer() {
    local candidate candidates=("$BIN")
    [[ $MODE == systemd ]] && candidates=("$PREFIX/.venv/bin/background-sync" "$BIN")
    for candidate in "${candidates[@]}"; do
        if [[ -x $candidate ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# log_view: a filter of log lines: on a terminal (stdout) `background-sync logs`, the short form
# with colours; as written otherwise, or when no viewer is installed.
log_view() {
    local viewer
    if [[ -t 1 ]] && viewer=$(log_viewer); then
        "$viewer" logs
    else
        cat
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

    local log_offset=0 err_offset=0
    [[ -f $LOGFILE ]] && log_offset=$(stat -c %s -- "$LOGFILE")
    [[ -f $ERRFILE ]] && err_offset=$(stat -c %s -- "$ERRFILE")
    # Job control is off in a script, so $! is the daemon itself: setsid execs without forking.
    # fd 9 (the lock) is closed so that the daemon does not hold the lock while it runs.
    # stdout (JSON lines) and stderr (plain text) go to files of their own, so that the log
    # stays pure JSON: the daemon logs a failed start there too, as a record.
    setsid nohup "$BIN" run >>"$LOGFILE" 2>>"$ERRFILE" </dev/null 9>&- &
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
        warn "background-sync exited during startup${rc:+ (exit status $rc)}"
        if [[ -s $ERRFILE ]] && (($(stat -c %s -- "$ERRFILE") > err_offset)); then
            tail -c "+$((err_offset + 1))" -- "$ERRFILE" 2>/dev/null | tail -n 20 >&2 || true
        fi
        warn "last lines of $LOGFILE:"
        tail -c "+$((log_offset + 1))" -- "$LOGFILE" 2>/dev/null | tail -n 20 | log_view >&2 || true
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
        [[ -s $ERRFILE ]] && info "its stderr, if it said why: $ERRFILE"
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
    if [[ -t 1 ]] && log_viewer >/dev/null; then
        tail -n "$lines" -- "$LOGFILE" | log_view
    else
        tail -n "$lines" -- "$LOGFILE"
    fi
}

selfmanaged_logs_follow() {
    local lines=${LINES:-100}
    require_int LINES "$lines"
    [[ -f $LOGFILE ]] || warn "no log yet: waiting for $LOGFILE to appear"
    if [[ -t 1 ]] && log_viewer >/dev/null; then
        tail -n "$lines" -F -- "$LOGFILE" | log_view
    else
        exec tail -n "$lines" -F -- "$LOGFILE"
    fi
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

# ----------------------------------------------------------------------------- mode

systemd_running() { [[ -d $SYSTEMD_DIR ]]; }
unit_installed() { [[ -f $UNIT_FILE ]]; }

# select_mode: systemd when systemd runs and the unit is installed, unless --no-systemd.
select_mode() {
    if ((FORCE_SELFMANAGED)); then
        MODE=selfmanaged
    elif systemd_running && unit_installed; then
        MODE=systemd
    else
        MODE=selfmanaged
    fi
}

cmd_mode() {
    select_mode
    if [[ $MODE == systemd ]]; then
        info "systemd (systemd runs and $UNIT_FILE is installed)"
    elif ((FORCE_SELFMANAGED)); then
        info "self-managed (--no-systemd)"
    elif ! systemd_running; then
        info "self-managed (systemd is not running: $SYSTEMD_DIR does not exist)"
    else
        info "self-managed ($UNIT_FILE is not installed: sudo ./$PROG install)"
    fi
}

usage_error() {
    warn "$*"
    usage >&2
    exit 2
}

require_root() {
    [[ $(id -u) == 0 ]] || die "$1 must run as root (sudo ./$PROG $1 ...)"
}

need_command() {
    command -v -- "$1" >/dev/null 2>&1 || die "$1 not found: $2"
}

# ----------------------------------------------------------------------------- systemd lifecycle

# unit_prop PROPERTY: the unit's property value (empty if systemd cannot tell).
unit_prop() {
    systemctl show --property="$1" --value -- "$SERVICE.service" 2>/dev/null || true
}

# describe_unit: "pid 123: idle, next cycle in 290 s" for messages.
describe_unit() {
    local pid text
    pid=$(unit_prop MainPID)
    text=$(unit_prop StatusText)
    printf 'pid %s%s\n' "${pid:-?}" "${text:+: $text}"
}

warn_selfmanaged_running() {
    local pid
    if pid=$(running_pid); then
        warn "note: a self-managed daemon from $ROOT is also running (pid $pid): stop it with '$PROG --no-systemd stop'"
    fi
}

# explain_failure SINCE_EPOCH: why the service did not start, and its log since then.
explain_failure() {
    local since=$1 result status
    result=$(unit_prop Result)
    status=$(unit_prop ExecMainStatus)
    warn "background-sync is not running (result: ${result:-?}, exit status: ${status:-?})"
    case $status in
    78) warn "exit status 78: a bad setting (the line below names it); fix $ENV_FILE and start again" ;;
    69) warn "exit status 69: the database was unreachable for 60 s; systemd retries (RestartSec=5)" ;;
    75) warn "exit status 75: the database stayed away longer than SYNC_DATABASE_OUTAGE_SECONDS" ;;
    243) warn "exit status 243 (CREDENTIALS): $TOKEN_FILE is missing or unreadable; re-run 'sudo ./$PROG install' (with --token-file PATH)" ;;
    esac
    warn "last lines of its log (journalctl -u $SERVICE -o cat):"
    journalctl -u "$SERVICE.service" -o cat --no-pager -n 20 --since "@$since" >&2 || true
}

systemd_start() {
    warn_selfmanaged_running
    if systemctl is-active --quiet -- "$SERVICE.service"; then
        info "background-sync is already running ($(describe_unit)); not starting another"
        return 0
    fi
    local since
    since=$(date +%s)
    info "starting background-sync (systemctl start: waits until the daemon is ready)..."
    if ! systemctl start -- "$SERVICE.service"; then
        explain_failure "$since"
        exit 1
    fi
    info "started background-sync ($(describe_unit)); logs: $PROG logs-follow"
}

systemd_stop() {
    local state
    state=$(unit_prop ActiveState)
    case $state in
    inactive | failed | "")
        info "background-sync is not running${state:+ ($state)}"
        return 0
        ;;
    esac
    local started
    started=$(now_ms)
    info "stopping background-sync (systemctl stop: in-flight calls get SYNC_SHUTDOWN_GRACE_SECONDS)..."
    systemctl stop -- "$SERVICE.service" || die "systemctl stop $SERVICE failed"
    info "stopped background-sync in $(format_ms $(($(now_ms) - started)))"
}

systemd_restart() {
    warn_selfmanaged_running
    local since
    since=$(date +%s)
    info "restarting background-sync (systemctl restart: drains, then waits until ready)..."
    if ! systemctl restart -- "$SERVICE.service"; then
        explain_failure "$since"
        exit 1
    fi
    info "restarted background-sync ($(describe_unit))"
}

# reload: validate the env file first (a rejected file would change nothing anyway), then SIGHUP
# and report what the daemon logged about it.
systemd_reload() {
    systemctl is-active --quiet -- "$SERVICE.service" || die "background-sync is not running: nothing to reload (start it)"
    if [[ -x $SERVICE_PYTHON && -r $ENV_FILE ]]; then
        service_check_config "$ENV_FILE" ||
            die "$ENV_FILE is invalid (above): not reloading; the daemon keeps its current settings"
    fi
    # What the daemon logs about this reload: everything after the journal's current end.
    local cursor since lines="" deadline
    cursor=$(journalctl -u "$SERVICE.service" -n 0 --show-cursor --quiet 2>/dev/null | sed -n 's/^-- cursor: //p') || cursor=""
    since=$(date +%s)
    systemctl reload -- "$SERVICE.service" || die "systemctl reload $SERVICE failed"
    local after=(--since "@$since")
    [[ -z $cursor ]] || after=(--after-cursor "$cursor")
    deadline=$(($(now_ms) + 5000))
    while (($(now_ms) < deadline)); do
        lines=$(journalctl -u "$SERVICE.service" -o cat --no-pager "${after[@]}" 2>/dev/null |
            grep -E '"event": ?"(config_reloaded|reload_rejected|reload_needs_restart)"') || lines=""
        [[ $lines == *config_reloaded* || $lines == *reload_rejected* ]] && break
        sleep 0.2
    done
    info "reloaded background-sync ($(describe_unit))"
    [[ -z $lines ]] || info "$lines"
    if [[ $lines == *reload_needs_restart* ]]; then
        warn "some changed settings apply only after: $PROG restart"
    fi
    return 0
}

systemd_status() {
    local state sub rc
    state=$(unit_prop ActiveState)
    sub=$(unit_prop SubState)
    case $state in
    active | reloading | deactivating) rc=0 ;;
    activating) if [[ $sub == auto-restart ]]; then rc=1; else rc=0; fi ;;
    failed) rc=1 ;;
    *) rc=3 ;;
    esac
    case $rc in
    0) info "background-sync is running under systemd ($(describe_unit))" ;;
    1) info "background-sync has failed under systemd ($state/$sub, result: $(unit_prop Result))" ;;
    *) info "background-sync is stopped (systemd unit ${state:-unknown})" ;;
    esac
    systemctl status --no-pager -- "$SERVICE.service" || true
    if ((rc == 0)) && [[ $(id -u) == 0 && -x $SERVICE_PYTHON ]]; then
        echo
        CLI_MAX_SECONDS=30 service_cli status || true
    fi
    exit "$rc"
}

systemd_logs() {
    local lines=${LINES:-100}
    require_int LINES "$lines"
    if [[ -t 1 ]] && log_viewer >/dev/null; then
        journalctl -u "$SERVICE.service" -o cat --no-pager -n "$lines" | log_view
    else
        exec journalctl -u "$SERVICE.service" -o cat --no-pager -n "$lines"
    fi
}

systemd_logs_follow() {
    local lines=${LINES:-100}
    require_int LINES "$lines"
    if [[ -t 1 ]] && log_viewer >/dev/null; then
        journalctl -u "$SERVICE.service" -o cat -n "$lines" -f | log_view
    else
        exec journalctl -u "$SERVICE.service" -o cat -n "$lines" -f
    fi
}

systemd_force() {
    systemctl is-active --quiet -- "$SERVICE.service" || die "background-sync is not running: nothing to force"
    # --kill-who (spelled --kill-whom since systemd 252, which still accepts this) = main: not ExecReload.
    systemctl kill --signal=USR1 --kill-who=main -- "$SERVICE.service"
    info "sent SIGUSR1 to background-sync ($(describe_unit)): a sync cycle starts now"
}

systemd_pause() {
    require_root pause
    service_cli pause || die "'background-sync pause' failed (exit status $?)"
}

systemd_resume() {
    require_root resume
    service_cli resume || die "'background-sync resume' failed (exit status $?)"
}

# service_cli ARGS...: `python -m daemon ARGS --env-file ENV_FILE` as the service runs it: the same
# dynamic user (User= makes it share the service's UID, so the running daemon keeps owning its
# state directory), state directory, env file and umask. Exit status: the command's. systemd
# ends it after CLI_MAX_SECONDS if that is set.
service_cli() {
    [[ -x $SERVICE_PYTHON ]] || die "$SERVICE_PYTHON is missing: run 'sudo ./$PROG install'"
    need_command systemd-run "it comes with systemd"
    local operator=${SUDO_USER:-}
    [[ -n $operator ]] || operator=$(id -un 2>/dev/null) || operator=root
    # A libpq password file, as the service gets it from its drop-in (docs/operations.md).
    local unit="$SERVICE-cli-$$" extra=()
    if [[ -f $PGPASS_FILE ]]; then
        extra=(--property=LoadCredential="pgpass:$PGPASS_FILE"
            --setenv=PGPASSFILE="/run/credentials/$unit.service/pgpass")
    fi
    # LOGNAME: `status` shows who paused; the daemon takes it from getpass.getuser().
    systemd-run --quiet --wait --pipe --collect --unit="$unit" "${extra[@]}" \
        --property=DynamicUser=yes --property=User="$SERVICE" \
        --property=StateDirectory="$SERVICE" --property=StateDirectoryMode=0700 \
        --property=UMask=0077 --property=EnvironmentFile=-"$ENV_FILE" \
        --property=PrivateTmp=yes --property=ProtectSystem=strict --property=ProtectHome=yes \
        --property=RuntimeMaxSec="${CLI_MAX_SECONDS:-infinity}" \
        --setenv=PYTHONDONTWRITEBYTECODE=1 --setenv=LOGNAME="$operator" \
        -- "$SERVICE_PYTHON" -m daemon "$@" --env-file "$ENV_FILE"
}

# service_check_config FILE: the settings in FILE are valid for the installed code (one line on
# stderr naming the variable otherwise). Runs as root, without touching the database.
service_check_config() {
    (cd / && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin STATE_DIRECTORY=/var/lib/$SERVICE \
        "$SERVICE_PYTHON" -m daemon check-config --offline --env-file "$1" >/dev/null)
}

# ----------------------------------------------------------------------------- install / uninstall

# install_python: the interpreter for the service's virtualenv, on stdout.
install_python() {
    local python=${PYTHON:-} version base
    if [[ -z $python ]]; then
        python=python3
        [[ -x /usr/bin/python3 ]] && python=/usr/bin/python3
    fi
    command -v -- "$python" >/dev/null 2>&1 ||
        die "Python interpreter '$python' not found: apt-get install python3 python3-venv (>= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR), or set PYTHON=/path/to/python3.11"
    version=$(python_version "$python") || die "'$python' does not run as a Python interpreter (set PYTHON=/path/to/python3.11)"
    python_is_recent "$version" ||
        die "'$python' is Python $version; background-sync needs Python >= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR (set PYTHON=/path/to/python3.11)"
    base=$("$python" -c 'import sys; print(sys.base_prefix)') || die "'$python' does not run"
    case $base/ in
    /home/* | /root/* | /run/user/*)
        die "'$python' is installed under $base, which the service cannot see (ProtectHome=yes): use a system python3 (apt-get install python3 python3-venv) or PYTHON=/usr/local/bin/python3.11"
        ;;
    esac
    printf '%s\n' "$python"
}

# python_identity PYTHON: "VERSION BASE_PREFIX", to tell whether a venv was made from PYTHON.
python_identity() {
    "$1" -c 'import sys, platform; print(platform.python_version(), sys.base_prefix)' 2>/dev/null
}

# check_token_file PATH: exactly one non-empty line, as the daemon requires.
check_token_file() {
    local path=$1 text
    [[ -f $path && -r $path ]] || die "--token-file $path: not a readable file"
    text=$(<"$path")
    text=${text#"${text%%[![:space:]]*}"}
    text=${text%"${text##*[![:space:]]}"}
    [[ -n $text ]] || die "--token-file $path is empty"
    [[ $text != *$'\n'* && $text != *$'\r'* ]] || die "--token-file $path must hold the token on one line"
}

# put_file SOURCE DEST MODE: install SOURCE as DEST (root-owned, MODE) by rename, unless DEST
# already has that content; then only owner and mode are set. Prints "installed", "updated" or
# "unchanged".
put_file() {
    local source=$1 dest=$2 mode=$3 what=installed
    if [[ -f $dest ]]; then
        what=updated
        if cmp -s -- "$source" "$dest"; then
            chown root:root -- "$dest"
            chmod "$mode" -- "$dest"
            echo unchanged
            return 0
        fi
    fi
    install -m "$mode" -o root -g root -- "$source" "$dest.tmp.$$"
    mv -f -- "$dest.tmp.$$" "$dest"
    echo "$what"
}

# matching_wheel DIR SRC: print the background_sync wheel in DIR whose package is exactly SRC's
# daemon/ (every module of SRC, byte for byte, and nothing else); fail if there is none.
matching_wheel() {
    "$SERVICE_PYTHON" - "$1" "$2" <<'PY'
import pathlib, sys, zipfile

house, src = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want = {
    p.relative_to(src).as_posix(): p.read_bytes()
    for p in (src / "daemon").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
}
modules = {name for name in want if name.endswith(".py")}
for wheel in sorted(house.glob("background_sync-*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        got = {
            name: archive.read(name)
            for name in archive.namelist()
            if name.startswith("daemon/") and not name.endswith("/")
        }
    if modules <= got.keys() and all(want.get(name) == data for name, data in got.items()):
        print(wheel)
        sys.exit(0)
sys.exit(1)
PY
}

INSTALL_STAGE=""
install_cleanup() {
    if [[ -n $INSTALL_STAGE && -d $INSTALL_STAGE ]]; then
        rm -rf -- "$INSTALL_STAGE"
    fi
}

cmd_install() {
    local token_src="" env_src=""
    while (($# > 0)); do
        case $1 in
        --token-file | --env-file)
            [[ $# -ge 2 && -n $2 ]] || usage_error "install: $1 needs a PATH"
            if [[ $1 == --token-file ]]; then token_src=$2; else env_src=$2; fi
            shift 2
            ;;
        --token-file=* | --env-file=*)
            [[ -n ${1#*=} ]] || usage_error "install: ${1%%=*} needs a PATH"
            if [[ $1 == --token-file=* ]]; then token_src=${1#*=}; else env_src=${1#*=}; fi
            shift
            ;;
        *) usage_error "install: unknown argument: $1" ;;
        esac
    done
    ((!FORCE_SELFMANAGED)) || usage_error "install sets up the systemd service: --no-systemd makes no sense with it"
    require_root install
    systemd_running || die "systemd is not running on this host ($SYSTEMD_DIR does not exist): install needs it; without systemd use '$PROG start'"
    need_command systemctl "install needs systemd"
    need_command systemd-run "install needs systemd"
    [[ -f $UNIT_SOURCE && -f $ENV_EXAMPLE ]] || die "$UNIT_SOURCE or $ENV_EXAMPLE is missing"
    [[ -z $token_src ]] || check_token_file "$token_src"
    [[ -z $env_src || (-f $env_src && -r $env_src) ]] || die "--env-file $env_src: not a readable file"
    local pip_source=()
    if [[ -n ${WHEELHOUSE:-} ]]; then
        [[ -d $WHEELHOUSE ]] || die "WHEELHOUSE=$WHEELHOUSE is not a directory"
        pip_source=(--no-index --find-links "$(readlink -f -- "$WHEELHOUSE")")
    fi
    umask 0022 # the service's dynamic user must read the code and the venv
    exec 7>>"/run/$SERVICE-install.lock"
    flock -w 600 7 || die "another install is still running (lock /run/$SERVICE-install.lock)"

    local python identity
    python=$(install_python)
    identity=$(python_identity "$python")

    # 1. Stage the code next to its destination (same file system: the swap is a rename).
    mkdir -p -- "$PREFIX"
    chmod 0755 -- "$PREFIX"
    INSTALL_STAGE=$(mktemp -d "$PREFIX/.stage.XXXXXX")
    trap install_cleanup EXIT
    local item
    for item in "${INSTALL_ITEMS[@]}"; do
        [[ -e $ROOT/$item ]] || die "$ROOT/$item is missing"
        cp -a -- "$ROOT/$item" "$INSTALL_STAGE/$item"
    done
    find "$INSTALL_STAGE" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf -- {} +
    chown -R root:root -- "$INSTALL_STAGE"
    chmod -R u=rwX,go=rX -- "$INSTALL_STAGE"
    local stamp_file="$PREFIX/.venv/.background-sync-install.sha256" want have=""
    want=$({
        printf '%s\n' "$identity"
        # What the venv is built from; the other items are copied for reference only.
        (cd "$INSTALL_STAGE" && find daemon pyproject.toml requirements.txt -type f -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1)
    [[ -f $stamp_file ]] && IFS= read -r have <"$stamp_file"
    local venv_ok=0
    if [[ -x $SERVICE_PYTHON ]] && [[ $(python_identity "$SERVICE_PYTHON") == "$identity" ]]; then
        venv_ok=1
    fi
    local code_changed=0
    ((venv_ok)) && [[ $want == "$have" ]] || code_changed=1

    local was_active=0 stopped=0
    systemctl is-active --quiet -- "$SERVICE.service" && was_active=1
    if ((code_changed && was_active)); then
        info "install: stopping background-sync for the upgrade (it is started again at the end)"
        systemctl stop -- "$SERVICE.service"
        stopped=1
    fi

    # 2. The virtualenv and the code.
    if ((code_changed)); then
        if ((!venv_ok)); then
            [[ ! -e $PREFIX/.venv ]] || info "install: recreating $PREFIX/.venv for $python ($identity)"
            rm -rf -- "$PREFIX/.venv"
            info "install: creating $PREFIX/.venv with $python (Python ${identity%% *})"
            "$python" -m venv "$PREFIX/.venv" ||
                die "could not create $PREFIX/.venv with '$python' (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
        info "install: installing requirements.txt and background-sync into $PREFIX/.venv${WHEELHOUSE:+ (offline, from $WHEELHOUSE)}"
        local pip=(env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
            "$SERVICE_PYTHON" -m pip install --quiet "${pip_source[@]}")
        "${pip[@]}" -r "$INSTALL_STAGE/requirements.txt" ||
            die "pip could not install requirements.txt${WHEELHOUSE:+ from $WHEELHOUSE (see: $PROG wheelhouse)}"
        # Not editable: the package is copied into the venv. From the wheelhouse's wheel of
        # this very code if there is one, else built here (the build needs setuptools>=68, from
        # the index or the wheelhouse).
        local wheel=""
        if [[ -n ${WHEELHOUSE:-} ]]; then
            wheel=$(matching_wheel "$WHEELHOUSE" "$INSTALL_STAGE") || wheel=""
        fi
        if [[ -n $wheel ]]; then
            info "install: background-sync from $wheel (the same code as $ROOT)"
            "${pip[@]}" --no-deps --force-reinstall "$wheel" || die "pip could not install $wheel"
        else
            "${pip[@]}" --no-deps --force-reinstall "$INSTALL_STAGE" ||
                die "pip could not build background-sync${WHEELHOUSE:+: $WHEELHOUSE needs setuptools or a wheel of this code (see: $PROG wheelhouse)}"
            rm -rf -- "$INSTALL_STAGE/build"
            find "$INSTALL_STAGE" -maxdepth 1 -name '*.egg-info' -exec rm -rf -- {} +
        fi
        (cd / && "$SERVICE_PYTHON" -c 'import daemon.cli, daemon.app') ||
            die "the installed background-sync does not import (above)"
        chmod -R go+rX -- "$PREFIX/.venv"
        printf '%s\n' "$want" >"$stamp_file"
        info "install: background-sync installed in $PREFIX/.venv"
    else
        info "install: $PREFIX/.venv is up to date"
    fi
    # The copy of the sources beside the venv: each item replaced by a rename.
    for item in "${INSTALL_ITEMS[@]}"; do
        if [[ -e $PREFIX/$item ]] && diff -r -q -- "$INSTALL_STAGE/$item" "$PREFIX/$item" >/dev/null 2>&1; then
            continue
        fi
        rm -rf -- "$PREFIX/.old-$item"
        if [[ -e $PREFIX/$item || -L $PREFIX/$item ]]; then
            mv -T -- "$PREFIX/$item" "$PREFIX/.old-$item"
        fi
        mv -T -- "$INSTALL_STAGE/$item" "$PREFIX/$item"
        rm -rf -- "$PREFIX/.old-$item"
    done
    install_cleanup
    INSTALL_STAGE=""

    # 3. Configuration: kept unless a new file is given.
    local config_changed=0 result
    install -d -m 0755 -o root -g root -- "$CONF_DIR"
    if [[ -n $env_src ]]; then
        service_check_config "$env_src" || die "--env-file $env_src is invalid (above): $ENV_FILE not changed"
        local backup=""
        if [[ -f $ENV_FILE ]] && ! cmp -s -- "$env_src" "$ENV_FILE"; then
            cp -p -- "$ENV_FILE" "$ENV_FILE.bak"
            backup="; the previous one is $ENV_FILE.bak"
        fi
        result=$(put_file "$env_src" "$ENV_FILE" 0644)
        [[ $result == unchanged ]] || config_changed=1
        info "install: $ENV_FILE $result (from $env_src$backup)"
    elif [[ ! -e $ENV_FILE ]]; then
        put_file "$ENV_EXAMPLE" "$ENV_FILE" 0644 >/dev/null
        config_changed=1
        info "install: $ENV_FILE created from the example (every setting at its default)"
    else
        info "install: $ENV_FILE kept"
        service_check_config "$ENV_FILE" || warn "$ENV_FILE is invalid (above): the service will exit 78 until it is fixed"
    fi
    local perms
    perms=$(stat -c %a -- "$ENV_FILE")
    if (((8#$perms & 8#004) == 0)); then
        warn "$ENV_FILE has mode $perms: the service's dynamic user cannot read it (run --env-file) and exits 78; chmod 0644 it and keep secrets in credentials (docs/operations.md)"
    fi
    if [[ -n $token_src ]]; then
        result=$(put_file "$token_src" "$TOKEN_FILE" 0600)
        [[ $result == unchanged ]] || config_changed=1
        info "install: $TOKEN_FILE $result (credential backend-token, mode 0600)"
    elif [[ -f $TOKEN_FILE ]]; then
        chown root:root -- "$TOKEN_FILE"
        chmod 0600 -- "$TOKEN_FILE"
        info "install: $TOKEN_FILE kept"
    else
        info "install: no backend token ($TOKEN_FILE is absent): requests carry no Authorization header"
    fi

    # 4. The unit, and the drop-in that drops LoadCredential= while there is no token file.
    install -d -m 0755 -- "$(dirname -- "$UNIT_FILE")"
    result=$(put_file "$UNIT_SOURCE" "$UNIT_FILE" 0644)
    [[ $result == unchanged ]] || config_changed=1
    info "install: $UNIT_FILE $result"
    if [[ -f $TOKEN_FILE ]]; then
        if [[ -e $NO_TOKEN_DROPIN ]]; then
            rm -f -- "$NO_TOKEN_DROPIN"
            rmdir -- "$UNIT_FILE.d" 2>/dev/null || true
            config_changed=1
            info "install: removed $NO_TOKEN_DROPIN (the token is loaded again)"
        fi
    else
        local dropin
        dropin=$(mktemp)
        cat >"$dropin" <<DROPIN
# Written by manage_background_sync.sh install because $TOKEN_FILE does not exist:
# LoadCredential= fails the start when its file is missing, so it is reset here.
# \`sudo ./manage_background_sync.sh install --token-file PATH\` installs a token and removes this file.
[Service]
LoadCredential=
DROPIN
        install -d -m 0755 -- "$UNIT_FILE.d"
        result=$(put_file "$dropin" "$NO_TOKEN_DROPIN" 0644)
        rm -f -- "$dropin"
        [[ $result == unchanged ]] || config_changed=1
        info "install: $NO_TOKEN_DROPIN $result"
    fi
    systemctl daemon-reload

    # 5. Migrations, as the service's user with its state directory and settings.
    info "install: running the migrations (background-sync migrate, as the service's dynamic user)"
    local rc=0
    service_cli migrate || rc=$?
    if ((rc != 0)); then
        ((stopped)) && warn "background-sync was stopped for the upgrade and stays stopped until this is fixed"
        die "the migrations failed (exit status $rc): fix the database settings in $ENV_FILE, then run install again"
    fi

    systemctl enable --quiet -- "$SERVICE.service"
    info "install: $SERVICE.service enabled (starts at boot)"

    # 6. Leave the service as it was: running again if it ran, stopped otherwise.
    local since
    since=$(date +%s)
    if ((stopped)); then
        info "install: starting background-sync again"
        systemctl start -- "$SERVICE.service" || {
            explain_failure "$since"
            exit 1
        }
        info "install: background-sync is running the new version ($(describe_unit))"
    elif ((was_active && config_changed)); then
        info "install: restarting background-sync for the new configuration"
        systemctl restart -- "$SERVICE.service" || {
            explain_failure "$since"
            exit 1
        }
        info "install: background-sync restarted ($(describe_unit))"
    elif ((was_active)); then
        info "install: nothing changed; background-sync keeps running ($(describe_unit))"
    else
        cat <<EOF

background-sync is installed but not started. Next:
  edit the settings:  $ENV_FILE
  start it:           sudo systemctl start $SERVICE   (or: sudo ./$PROG start)
  follow its log:     journalctl -u $SERVICE -o cat -f
EOF
    fi
}

cmd_uninstall() {
    local purge=0
    while (($# > 0)); do
        case $1 in
        --purge) purge=1 ;;
        *) usage_error "uninstall: unknown argument: $1" ;;
        esac
        shift
    done
    require_root uninstall
    if systemd_running && command -v systemctl >/dev/null 2>&1; then
        if [[ -n $(unit_prop FragmentPath) ]] || unit_installed; then
            info "uninstall: stopping and disabling $SERVICE.service"
            systemctl disable --now --quiet -- "$SERVICE.service" 2>/dev/null || true
            if systemctl is-active --quiet -- "$SERVICE.service"; then
                die "$SERVICE.service is still running: stop it (systemctl stop $SERVICE) and run uninstall again"
            fi
        fi
    fi
    rm -f -- "$UNIT_FILE" "$NO_TOKEN_DROPIN"
    if ((purge)); then
        rm -rf -- "$UNIT_FILE.d"
    else
        rmdir -- "$UNIT_FILE.d" 2>/dev/null || true
    fi
    rm -rf -- "$PREFIX"
    if systemd_running && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        systemctl reset-failed -- "$SERVICE.service" 2>/dev/null || true
    fi
    info "uninstall: removed $UNIT_FILE and $PREFIX"
    if ((purge)); then
        rm -rf -- "$CONF_DIR" "${STATE_DIRS[@]}"
        info "uninstall: purged $CONF_DIR and ${STATE_DIRS[*]} (settings, token, SQLite database)"
    else
        info "uninstall: kept $CONF_DIR (settings, token) and ${STATE_DIRS[0]} (the SQLite database); 'uninstall --purge' removes them"
    fi
}

# wheelhouse DIR: the wheels `WHEELHOUSE=DIR install` needs (requirements.txt, the build backend
# and a wheel of this checkout), for the interpreter install would use. Needs the index.
WHEELHOUSE_TMP=""
cmd_wheelhouse() {
    [[ $# -eq 1 && -n ${1:-} ]] || usage_error "wheelhouse needs a DIR"
    local dir=$1 python pip_python item
    python=$(install_python)
    mkdir -p -- "$dir"
    WHEELHOUSE_TMP=$(mktemp -d)
    trap 'rm -rf -- "$WHEELHOUSE_TMP"' EXIT
    pip_python=$python
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        # Debian's python3 has no pip module: a throwaway venv of the same interpreter has one.
        "$python" -m venv "$WHEELHOUSE_TMP/venv" || die "could not create a venv with '$python' (apt-get install python3-venv)"
        pip_python=$WHEELHOUSE_TMP/venv/bin/python
    fi
    local pip=(env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$pip_python" -m pip)
    # `wheel`, not `download`: an sdist-only requirement (sdnotify) must become a wheel here.
    "${pip[@]}" wheel --quiet --wheel-dir "$dir" -r "$ROOT/requirements.txt" "$BUILD_REQUIREMENT" ||
        die "pip could not fetch or build the wheels of requirements.txt"
    # The project's own wheel, built from a copy (pip builds in the tree).
    mkdir -p -- "$WHEELHOUSE_TMP/src"
    for item in daemon pyproject.toml README.md; do
        cp -a -- "$ROOT/$item" "$WHEELHOUSE_TMP/src/$item"
    done
    find "$WHEELHOUSE_TMP/src" -name __pycache__ -prune -exec rm -rf -- {} +
    rm -f -- "$dir"/background_sync-*.whl
    "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$dir" "$WHEELHOUSE_TMP/src" || die "could not build the wheel of $ROOT"
    info "wheelhouse: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels in $dir for $python (Python $(python_version "$python"))"
    info "install offline with: sudo WHEELHOUSE=$(readlink -f -- "$dir") ./$PROG install"
}

# ----------------------------------------------------------------------------- main

main() {
    while (($# > 0)); do
        case $1 in
        --no-systemd)
            FORCE_SELFMANAGED=1
            shift
            ;;
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
    install) cmd_install "$@" ;;
    uninstall) cmd_uninstall "$@" ;;
    wheelhouse) cmd_wheelhouse "$@" ;;
    mode) cmd_mode ;;
    start | stop | restart | reload | status | logs | logs-follow | force | pause | resume)
        (($# == 0)) || usage_error "$command takes no arguments (got: $*)"
        select_mode
        "${MODE}_${command//-/_}"
        ;;
    help) usage ;;
    *)
        warn "unknown command: $command"
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
