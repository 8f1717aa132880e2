#!/usr/bin/env bash
# check-unit.sh - check systemd/background-sync.service as it is installed.
#
#   systemd/check-unit.sh [UNIT_FILE]      (default: the background-sync.service next to this script)
#
# 1. `systemd-analyze verify` must print nothing. The unit names
#    /opt/background-sync/.venv/bin/python, which only `manage_background_sync.sh install` creates,
#    so the check runs with --root=<a throwaway tree> holding: the unit itself (byte for byte,
#    at /etc/systemd/system/), the host's systemd unit directory (targets the unit depends on),
#    the host's own copy of every other program an Exec*= line names (so a wrong path still fails),
#    and an empty executable only for the paths under /opt/background-sync that the installer
#    creates. Nothing in the unit is rewritten.
# 2. `systemd-analyze security --offline=true` must rate the unit at most MAX_EXPOSURE (1.5).
#
# Exit status 0 when both pass, 1 otherwise. Needs systemd-analyze (systemd >= 252); PID 1 need
# not be systemd.
set -Eeuo pipefail

PROG=$(basename -- "${BASH_SOURCE[0]}")
HERE=$(cd -P -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)
UNIT=${1:-$HERE/background-sync.service}
MAX_EXPOSURE=${MAX_EXPOSURE:-1.5}
INSTALL_PREFIX=/opt/background-sync # what the installer creates

die() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 1
}

command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze not found (apt-get install systemd)"
[[ -f $UNIT ]] || die "no such unit file: $UNIT"
UNIT=$(readlink -f -- "$UNIT")
NAME=$(basename -- "$UNIT")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-unit.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
ROOT=$WORK/root

# ----------------------------------------------------------------------------- the throwaway root

host_unit_dir=""
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -f $dir/sysinit.target ]]; then
        host_unit_dir=$dir
        break
    fi
done
[[ -n $host_unit_dir ]] || die "the host's systemd unit directory (with sysinit.target) was not found"

mkdir -p "$ROOT/usr/lib/systemd" "$ROOT/etc/systemd/system" "$ROOT/usr/bin" "$ROOT/usr/sbin"
cp -a -- "$host_unit_dir" "$ROOT/usr/lib/systemd/system"
# Merged /usr (Debian >= 12): /bin and /sbin are links into /usr, as on the host.
for link in bin sbin lib; do
    if [[ -L /$link ]]; then
        ln -s "usr/$link" "$ROOT/$link"
    fi
done
mkdir -p "$ROOT/bin" "$ROOT/sbin"
cp -- "$UNIT" "$ROOT/etc/systemd/system/$NAME"

# Every program named by an Exec*= line: strip systemd's prefixes (-@:+!), take the first word.
missing=0
while IFS= read -r program; do
    [[ -n $program ]] || continue
    if [[ $program != /* ]]; then
        continue # systemd resolves a bare name in its own search path; verify reports a bad one
    fi
    target="$ROOT$program"
    [[ -e $target ]] && continue
    mkdir -p -- "$(dirname -- "$target")"
    if [[ $program == "$INSTALL_PREFIX"/* ]]; then
        printf '#!/bin/sh\nexit 0\n' >"$target"
        chmod 0755 -- "$target"
    elif [[ -x $program ]]; then
        cp -L -- "$program" "$target"
    else
        printf '%s: %s: %s is not an executable on this host\n' "$PROG" "$NAME" "$program" >&2
        missing=1
    fi
done < <(sed -nE 's/^[[:space:]]*Exec[A-Za-z]+=[[:space:]]*[-@:+!]*([^[:space:]]+).*/\1/p' -- "$UNIT")

# ----------------------------------------------------------------------------- 1. verify

man_check=(--man=no)
if command -v man >/dev/null 2>&1; then
    man_check=(--man=yes)
fi
verify_out=$WORK/verify.out
verify_rc=0
# verify prints problems on stderr and sets no useful exit status for every kind: both count.
systemd-analyze verify "${man_check[@]}" --root="$ROOT" "/etc/systemd/system/$NAME" \
    >"$verify_out" 2>&1 || verify_rc=$?
printf '$ systemd-analyze verify %s --root=<throwaway root> /etc/systemd/system/%s\n' "${man_check[*]}" "$NAME"
if [[ -s $verify_out ]]; then
    sed 's/^/  /' -- "$verify_out"
fi
verify_ok=1
if ((verify_rc != 0)) || [[ -s $verify_out ]] || ((missing)); then
    verify_ok=0
    printf 'verify: FAILED (exit status %d)\n' "$verify_rc"
else
    printf 'verify: clean\n'
fi

# ----------------------------------------------------------------------------- 2. security

security_out=$WORK/security.out
security_rc=0
systemd-analyze security --offline=true --no-pager "$UNIT" >"$security_out" 2>&1 || security_rc=$?
printf '\n$ systemd-analyze security --offline=true %s\n' "$UNIT"
# The settings that still cost exposure (lines starting with ✗), then the total.
grep -E '^(✗|→)|exposure' -- "$security_out" | sed 's/^/  /' || true
exposure=$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+([.][0-9]+)?).*/\1/p' -- "$security_out" | tail -n 1)
security_ok=1
if ((security_rc != 0)) || [[ -z $exposure ]]; then
    security_ok=0
    cat -- "$security_out" >&2
    printf 'security: FAILED (no exposure figure, exit status %d)\n' "$security_rc"
elif awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e <= max) }'; then
    printf 'security: exposure %s <= %s: OK\n' "$exposure" "$MAX_EXPOSURE"
else
    security_ok=0
    printf 'security: exposure %s > %s: FAILED\n' "$exposure" "$MAX_EXPOSURE"
fi

if ((verify_ok && security_ok)); then
    printf '\n%s: %s passed\n' "$PROG" "$NAME"
    exit 0
fi
printf '\n%s: %s FAILED\n' "$PROG" "$NAME" >&2
exit 1
