#!/usr/bin/env bash
# vbusemu bootstrap: ./run.sh [test [pytest args] | <vbusemu args>]
#   no argument  -> the main job: vbusemu run (two VMs through venet, disks, consoles)
#   test         -> the whole pytest suite (extra args go to pytest)
#   anything else-> vbusemu <args>
# Creates .venv with the machine's python3 when missing, or reinstalls when
# pyproject.toml changed since the last install. Quiet when nothing to do. Concurrent
# first runs take turns on .venv.lock: one sets up, the others wait and reuse it.
set -euo pipefail
# Ctrl-C before vbusemu starts (setting up .venv): one line, exit 130 -- on the terminal's
# stderr (fd 8), not into the install log the setup's output is redirected to.
exec 8>&2
trap 'printf "run.sh: interrupted\n" >&8; exit 130' INT
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="$here/.venv"
stamp="$venv/.vbusemu-installed"
log="$venv/install.log"
lock="$here/.venv.lock"

die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
ready() { [ -x "$venv/bin/python" ] && [ "$want" = "$(cat "$stamp" 2>/dev/null || true)" ]; }

if ! ready; then
  python="${PYTHON:-python3}"
  command -v "$python" >/dev/null 2>&1 || die "python3 not found on PATH (need Python >= 3.10)"
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
    || die "$("$python" -V 2>&1) is too old: vbusemu needs Python >= 3.10"
  # Two first runs at once must not both build .venv: take an exclusive lock (next to
  # .venv, which may not exist yet), then look again -- the other run may have finished
  # the job while we waited. The lock is dropped before the command below runs.
  if command -v flock >/dev/null 2>&1; then
    exec 9>>"$lock" || die "cannot open the setup lock $lock"
    if ! flock -n 9; then
      echo "run.sh: waiting for another run.sh to finish setting up $venv ..." >&2
      flock 9 || die "cannot take the setup lock $lock"
    fi
  fi
  if ! ready; then
    echo "run.sh: setting up $venv (first run or pyproject.toml changed) ..." >&2
    if [ ! -x "$venv/bin/python" ]; then
      "$python" -m venv "$venv" || die "could not create a virtualenv in $venv (is python3-venv installed?)"
    fi
    rm -f "$stamp"
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip \
           && "$venv/bin/python" -m pip install -q -e ".[test,dev,bench]"; } >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      die "installing vbusemu into $venv failed (full log: $log)"
    fi
    echo "$want" >"$stamp"
  fi
  exec 9>&-  # closing our only descriptor of the lock file releases the lock
fi

export PATH="$venv/bin:$PATH"
exec 8>&-  # (only for the interrupted line above; vbusemu and pytest do not inherit it)
trap 'printf "run.sh: interrupted\n" >&2; exit 130' INT
if [ "${1-}" = test ]; then
  shift; exec "$venv/bin/python" -m pytest "$@"
fi
# vbusemu starts with Ctrl-C ignored (so no KeyboardInterrupt can land while Python
# starts up) and takes it over at once: VBUSEMU_CTRL_C tells it the ignore is ours.
trap '' INT
export VBUSEMU_CTRL_C=1
case "${1-}" in
  "")   exec "$venv/bin/vbusemu" run ;;
  *)    exec "$venv/bin/vbusemu" "$@" ;;
esac
