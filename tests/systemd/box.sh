#!/usr/bin/env bash
# box.sh - a real systemd as PID 1, in namespaces of its own, over a root filesystem of its own.
#
# The systemd tests (tests/systemd) drive this script from a pytest fixture. It boots systemd
# exactly as an operator's machine would run it, but inside private pid, mount, uts, ipc, net and
# cgroup namespaces, on an overlay over a cached Debian tree made with debootstrap. It is a test
# fixture, not a security boundary, and needs root.
#
#   box.sh check                     exit 0 if this machine can create the namespaces, else say why
#   box.sh build                     build the Debian tree unless cached; print its path
#   box.sh boot NAME [SRC:DST ...]   boot box NAME; each SRC (a host folder) is bound read-only at DST
#   box.sh exec NAME -- CMD ...      run CMD inside the box, in all of its namespaces
#   box.sh pid NAME                  print the host pid of the box's systemd (exit 1 if not running)
#   box.sh stop NAME                 power off (SIGRTMIN+4), SIGKILL on timeout, remove cgroup + state
#   box.sh reap PREFIX               stop the boxes named PREFIX* whose owner process is gone
#
# Environment: BOX_DIR (default /var/tmp/background-sync-systemd-box), BOX_MIRROR (a Debian mirror;
# default: the first one in the host's apt sources), BOX_OWNER (the pid owning a box, for reap;
# default: the caller of boot), BOX_BOOT_TIMEOUT (seconds, default 60).
#
# Never run systemd over the host's root: its boot-time cleanups would empty the host's /tmp and
# more. The last stage refuses to exec systemd unless / is the box's overlay and the host's old
# root is detached.
set -Eeuo pipefail

SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
BOX_DIR=${BOX_DIR:-/var/tmp/background-sync-systemd-box}
SUITE=bookworm
# Everything the box needs at run time: the network is loopback only, so nothing is installed
# later except the project's own wheels (from a wheelhouse bound in read-only).
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,python3-pip,procps,curl,ca-certificates
# Bump when the build steps change, so that a cached tree from older steps is not reused.
LAYOUT=1
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$LAYOUT" | sha256sum | cut -c1-12)
ROOTFS=$BOX_DIR/rootfs-$KEY
MARKER=.background-sync-box-rootfs
# Capabilities no process in the box gets (about what systemd-nspawn withholds).
DROP_CAPS=-sys_module,-sys_rawio,-sys_time,-sys_pacct,-syslog,-wake_alarm,-block_suspend
DROP_CAPS+=,-mac_admin,-mac_override,-audit_read,-bpf,-perfmon,-checkpoint_restore,-ipc_lock
BOX_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Units that would take the box down (gettys hang up the console) or touch the host's
# disks and hardware, or that have nothing to do in a test box.
MASKED_UNITS=(
    console-getty.service container-getty@.service getty@tty1.service serial-getty@.service
    getty.target fstrim.timer fstrim.service e2scrub_all.timer e2scrub_all.service
    e2scrub_reap.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer
    systemd-pstore.service sys-fs-fuse-connections.mount sys-kernel-config.mount
    sys-kernel-debug.mount sys-kernel-tracing.mount systemd-timesyncd.service
    systemd-networkd.service systemd-resolved.service systemd-hwdb-update.service
    systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service
    systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
)

say() { printf 'box.sh: %s\n' "$*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

cgroup2_mount() { findmnt -rn -t cgroup2 -o TARGET | head -n1; }

valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "bad box name '$1'"; }

# state NAME: set S (state dir), CG (cgroup dir) and PIDFILE for box NAME.
state() {
    valid_name "$1"
    NAME=$1
    S=$BOX_DIR/boxes/$1
    PIDFILE=$S/pid
    local cg2
    cg2=$(cgroup2_mount)
    CG=${cg2:+$cg2/background-sync-box.$1}
}

parent_of() { awk '/^PPid:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# box_pid: the host pid of box NAME's systemd, if it runs (a pid of another pid namespace).
box_pid() {
    local p
    p=$(cat -- "$PIDFILE" 2>/dev/null) && [[ $p =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$p/comm" 2>/dev/null) == systemd ]] || return 1
    local ns
    ns=$(readlink "/proc/$p/ns/pid" 2>/dev/null) || return 1 # a zombie has none
    [[ $ns != "$(readlink /proc/self/ns/pid)" ]] || return 1
    printf '%s\n' "$p"
}

# host_mounts_under DIR: the host's mounts at or below DIR (there should never be any: every
# mount of a box is made inside its own mount namespace).
host_mounts_under() { findmnt -rno TARGET | awk -v d="$1" 'index($0 "/", d "/") == 1'; }

remove_cgroup() {
    [[ -n $CG && -d $CG ]] || return 0
    local i
    for ((i = 0; i < 100; i++)); do
        grep -q '^populated 0' "$CG/cgroup.events" && break
        sleep 0.1
    done
    grep -q '^populated 0' "$CG/cgroup.events" || die "cgroup $CG still has processes"
    find "$CG" -depth -type d -exec rmdir -- {} +
}

mirror() {
    if [[ -n ${BOX_MIRROR:-} ]]; then
        printf '%s\n' "$BOX_MIRROR"
        return
    fi
    local m
    m=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -E '^(URIs:|deb )' | grep -v -e security -e updates | grep -oE 'https?://[^ ]+' |
        head -n1) || true
    [[ -n $m ]] || die "no Debian mirror in the host's apt sources; set BOX_MIRROR"
    printf '%s\n' "$m"
}

# ----------------------------------------------------------------------------- commands

cmd_check() {
    [[ $(id -u) == 0 ]] || die "not root: booting systemd in namespaces needs root"
    local cg2 probe
    cg2=$(cgroup2_mount)
    [[ -n $cg2 ]] || die "no cgroup2 hierarchy is mounted on this host"
    probe=$cg2/background-sync-box-probe.$$
    mkdir -- "$probe" 2>/dev/null || die "cannot create a cgroup under $cg2"
    rmdir -- "$probe"
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
        die "the kernel has no overlay filesystem"
    for tool in unshare nsenter setpriv script findmnt; do
        command -v "$tool" >/dev/null || die "$tool is missing (util-linux, bsdutils)"
    done
    local out
    out=$(unshare --fork --pid --mount --uts --ipc --net --cgroup --propagation private \
        -- sh -c 'mount -t tmpfs none /mnt && echo ok' 2>&1) ||
        die "cannot create pid/mount/uts/ipc/net/cgroup namespaces: $out"
    [[ $out == ok ]] || die "namespaces probe said: $out"
}

cmd_build() {
    if [[ -f $ROOTFS/$MARKER ]]; then
        say "rootfs cached: $ROOTFS"
        printf '%s\n' "$ROOTFS"
        return 0
    fi
    mkdir -p -- "$BOX_DIR"
    exec 7>"$BOX_DIR/build.lock"
    flock -w 900 7 || die "another build holds $BOX_DIR/build.lock"
    if [[ -f $ROOTFS/$MARKER ]]; then # built while we waited
        printf '%s\n' "$ROOTFS"
        return 0
    fi
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap"
        { apt-get install -y -qq debootstrap || {
            apt-get update -qq && apt-get install -y -qq debootstrap
        }; } >"$BOX_DIR/apt.log" 2>&1 || die "apt-get install debootstrap failed, see $BOX_DIR/apt.log"
    fi
    local tmp=$ROOTFS.partial m t0=$EPOCHREALTIME
    [[ -z $(host_mounts_under "$BOX_DIR") ]] || die "host has mounts under $BOX_DIR"
    rm -rf --one-file-system -- "$tmp"
    m=$(mirror)
    say "debootstrap $SUITE ($PACKAGES) from $m; log $BOX_DIR/build.log"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$m" \
        >"$BOX_DIR/build.log" 2>&1 || die "debootstrap failed; see $BOX_DIR/build.log"
    # apt's package lists and caches are of no use in a box without network.
    rm -rf --one-file-system -- "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
    mkdir -p -- "$tmp/.oldroot"
    touch -- "$tmp/$MARKER"
    mv -T -- "$tmp" "$ROOTFS"
    # Trees of earlier package lists, unless a box may still run over one.
    if [[ -z $(find "$BOX_DIR/boxes" -mindepth 1 -maxdepth 1 2>/dev/null) ]]; then
        local old
        for old in "$BOX_DIR"/rootfs-*; do
            [[ $old != "$ROOTFS" && -d $old ]] || continue
            say "removing the rootfs of an earlier package list: $old"
            rm -rf --one-file-system -- "$old"
        done
    fi
    say "rootfs built in $(elapsed "$t0")s: $ROOTFS ($(du -sh --one-file-system "$ROOTFS" | cut -f1))"
    printf '%s\n' "$ROOTFS"
}

cmd_boot() {
    state "$1"
    shift
    [[ -f $ROOTFS/$MARKER ]] || cmd_build >/dev/null
    [[ -n $CG ]] || die "no cgroup2 hierarchy is mounted on this host"
    if box_pid >/dev/null; then die "box $NAME is already running (pid $(box_pid))"; fi
    [[ ! -e $S ]] || die "$S exists: stop the box first (box.sh stop $NAME)"
    [[ ! -d $CG ]] || remove_cgroup
    local bind src
    mkdir -p -- "$S/upper" "$S/work" "$S/merged"
    : >"$S/binds"
    for bind in "$@"; do
        [[ $bind == /*:/* ]] || die "bind '$bind' is not SRC:DST with absolute paths"
        src=$(readlink -e -- "${bind%%:*}") || die "bind source ${bind%%:*} does not exist"
        case $src in
        / | /tmp | /run | /var | /var/tmp | /home | /root | /etc | /usr | /proc* | /sys* | /dev*)
            die "refusing to bind $src into the box"
            ;;
        esac
        printf '%s:%s\n' "$src" "${bind#*:}" >>"$S/binds"
    done
    printf '%s\n' "${BOX_OWNER:-$PPID}" >"$S/owner"
    : >"$S/console.log"
    mkdir -- "$CG"
    local t0=$EPOCHREALTIME i st=""
    # script(1) gives the box a pty for /dev/console (logged to console.log) and a session of
    # its own; setsid detaches it from the caller.
    setsid script -qfec "$(printf '%q ' "$SELF" _outer "$NAME")" "$S/console.log" \
        </dev/null >/dev/null 2>&1 &
    for ((i = 0; i < 100; i++)); do
        box_pid >/dev/null && break
        sleep 0.05
    done
    box_pid >/dev/null || die "systemd did not start; console: $(tail -c 2000 "$S/console.log")"
    local deadline=$((SECONDS + ${BOX_BOOT_TIMEOUT:-60}))
    while ((SECONDS < deadline)); do
        box_pid >/dev/null || die "systemd died while booting; console: $(tail -c 2000 "$S/console.log")"
        st=$(timeout 20 "$SELF" exec "$NAME" -- systemctl is-system-running --wait 2>/dev/null) || true
        case $st in running | degraded) break ;; esac
        sleep 0.1
    done
    case $st in
    running) ;;
    degraded) say "booted degraded; failed units: $("$SELF" exec "$NAME" -- systemctl --failed --plain --no-legend | tr '\n' ' ')" ;;
    *) die "boot did not finish (state '$st'); console: $S/console.log" ;;
    esac
    say "box $NAME booted in $(elapsed "$t0")s (pid $(box_pid), state $st)"
}

cmd_exec() {
    state "$1"
    shift
    [[ ${1:-} == -- ]] && shift
    local p
    p=$(box_pid) || die "box $NAME is not running"
    exec setpriv --bounding-set "$DROP_CAPS" nsenter --target "$p" --all --root --wd \
        env -i PATH="$BOX_PATH" HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER=cat \
        SYSTEMD_COLORS=0 SYSTEMD_URLIFY=0 "$@"
}

cmd_pid() {
    state "$1"
    box_pid
}

cmd_stop() {
    state "$1"
    local p wrapper console i
    if p=$(box_pid); then
        wrapper=$(parent_of "$p")         # unshare
        console=$(parent_of "$wrapper") # script(1)
        kill -s SIGRTMIN+4 "$p" # poweroff; PID 1 ignores SIGTERM
        for ((i = 0; i < 200; i++)); do
            [[ -d /proc/$p ]] || break
            sleep 0.05
        done
        if [[ -d /proc/$p ]]; then
            say "box $NAME did not power off within 10s: SIGKILL $p"
            kill -9 "$p" 2>/dev/null || true
        fi
        for ((i = 0; i < 100; i++)); do
            [[ -d /proc/$console ]] || break
            sleep 0.05
        done
        if [[ $(cat "/proc/$console/comm" 2>/dev/null) == script ]]; then kill "$console" 2>/dev/null || true; fi
        say "box $NAME stopped (pid $p)"
    fi
    rm -f -- "$PIDFILE"
    remove_cgroup
    local left
    left=$(host_mounts_under "$S")
    [[ -z $left ]] || die "host has mounts under $S: $left"
    [[ ! -d $S ]] || rm -rf --one-file-system -- "$S"
}

cmd_reap() {
    local prefix=${1:-} dir owner
    valid_name "${prefix:-x}"
    for dir in "$BOX_DIR"/boxes/"$prefix"*/; do
        [[ -d $dir ]] || continue
        owner=$(cat -- "$dir/owner" 2>/dev/null || echo 0)
        if [[ $owner =~ ^[0-9]+$ ]] && ((owner > 0)) && [[ -d /proc/$owner ]]; then continue; fi
        say "reaping box $(basename -- "$dir") (owner $owner is gone)"
        "$SELF" stop "$(basename -- "$dir")" || true
    done
}

# ----------------------------------------------------------------------------- boot stages

# 1: on the console pty. New namespaces; the forked child is PID 1 of the new pid namespace.
stage_outer() {
    state "$1"
    trap '' HUP # a console hangup must not end unshare (its --kill-child would end systemd)
    exec setpriv --bounding-set "$DROP_CAPS" unshare --fork --kill-child --pid --mount --uts \
        --ipc --net --propagation private -- "$SELF" _init "$NAME"
}

# 2: PID 1 of the new pid namespace; /proc is still the host's, so /proc/self is the host pid.
stage_init() {
    state "$1"
    local host_pid _
    read -r host_pid _ </proc/self/stat
    echo 0 >"$CG/cgroup.procs"
    printf '%s\n' "$host_pid" >"$PIDFILE"
    exec unshare --cgroup -- "$SELF" _root "$NAME" # the cgroup namespace is rooted at $CG
}

# box_config ROOT: settings of a box, written into the overlay (never into the cached tree).
box_config() {
    local r=$1 unit
    printf 'bsbox\n' >"$r/etc/hostname"
    if ! grep -qs '^127\.0\.0\.1[[:space:]].*localhost' "$r/etc/hosts"; then
        printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tbsbox\n' \
            >"$r/etc/hosts"
    fi
    mkdir -p -- "$r/etc/systemd/journald.conf.d" "$r/etc/systemd/system"
    printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' >"$r/etc/systemd/journald.conf.d/box.conf"
    for unit in "${MASKED_UNITS[@]}"; do ln -sfn /dev/null "$r/etc/systemd/system/$unit"; done
}

# 3: in all the new namespaces: build the box's root, pivot into it, exec systemd.
stage_root() {
    state "$1"
    local r=$S/merged tty src dst
    tty=$(tty)
    [[ -f $ROOTFS/$MARKER ]] || die "$ROOTFS is not a box rootfs"
    mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$S/upper,workdir=$S/work" "$r"
    box_config "$r"
    mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
    for src in sys sysrq-trigger; do # the host kernel's knobs stay read-only
        [[ -e $r/proc/$src ]] || continue
        mount --bind "$r/proc/$src" "$r/proc/$src"
        mount -o remount,bind,ro "$r/proc/$src"
    done
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$r/sys/fs/cgroup"
    mount -t tmpfs -o mode=755,nosuid,size=4m tmpfs "$r/dev"
    set -- null 1 3 zero 1 5 full 1 7 random 1 8 urandom 1 9 tty 5 0
    while (($# > 0)); do
        mknod -m 666 "$r/dev/$1" c "$2" "$3"
        shift 3
    done
    mkdir -m 755 "$r/dev/pts"
    mkdir -m 1777 "$r/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$r/dev/pts"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/dev/shm"
    ln -s pts/ptmx "$r/dev/ptmx"
    ln -s /proc/self/fd "$r/dev/fd"
    ln -s /proc/self/fd/0 "$r/dev/stdin"
    ln -s /proc/self/fd/1 "$r/dev/stdout"
    ln -s /proc/self/fd/2 "$r/dev/stderr"
    touch "$r/dev/console"
    mount --bind "$tty" "$r/dev/console"
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$r/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/tmp"
    while IFS=: read -r src dst; do
        [[ -n $src ]] || continue
        mkdir -p -- "$r$dst"
        mount --bind "$src" "$r$dst"
        mount -o remount,bind,ro "$r$dst"
    done <"$S/binds"
    cd -- "$r"
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
    # Shared propagation inside the box, as a container manager gives it: systemd skips its
    # own `make-rshared /` in a container, and without it the credentials it mounts for a
    # service (LoadCredential=) never show up. The box's namespace is private to the host.
    mount --make-rshared /
    # Never exec systemd unless / is the box's own tree and the host's root is gone from view.
    if [[ ! -f /$MARKER ]] || mountpoint -q /.oldroot || [[ $(findmnt -rno FSTYPE /) != overlay ]]; then
        echo "box.sh: pivot_root did not leave the box's tree as / - not starting systemd" >&2
        exit 1
    fi
    exec env -i container=background-sync-box TERM=dumb PATH="$BOX_PATH" /lib/systemd/systemd
}

[[ $(id -u) == 0 ]] || die "must run as root"
command=${1:-}
shift || true
case $command in
check) cmd_check ;;
build) cmd_build ;;
boot) cmd_boot "$@" ;;
exec) cmd_exec "$@" ;;
pid) cmd_pid "$@" ;;
stop) cmd_stop "$@" ;;
reap) cmd_reap "$@" ;;
_outer) stage_outer "$@" ;;
_init) stage_init "$@" ;;
_root) stage_root "$@" ;;
*)
    sed -n '2,20p' "$SELF" >&2
    exit 2
    ;;
esac
