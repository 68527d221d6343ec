#!/bin/sh
# The Makefile's Python: pick one that can run Pensieve, and keep .venv made by one.
#
#   tools/venv.sh pick              print the interpreter `create` would use
#   tools/venv.sh create VENV       make VENV (kept when its interpreter passes)
#   tools/venv.sh check VENV STAMP  forget STAMP when VENV's interpreter is gone or fails
#   tools/venv.sh in-use VENV       warn when the installed login service runs VENV
#
# An interpreter passes when it is Python 3.11 or newer and the platform check
# (daemon/pensieved/service/preflight.py: Apple silicon, a native arm64 Python,
# macOS 14) says yes. The choice: $PYTHON when set; otherwise the newest of
# python3.13, python3.12, python3.11 and python3 on PATH that passes; otherwise
# `uv venv`, which fetches a Python. Why: a stock Mac's python3 is Apple's 3.9,
# which pip refuses for this project, and `python3.12 -m venv .venv` over a 3.9
# venv leaves bin/python pointing at 3.9, so a bad venv is removed, not reused.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
preflight="$root/daemon/pensieved/service/preflight.py"

# passes PYTHON: true when it can run Pensieve; otherwise $why says why not.
passes() {
    version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || version=""
    major=${version%%.*}
    minor=${version#*.}
    case "$major.$minor" in
        *[!0-9.]* | .* | *.) why="$1 does not run"; return 1 ;;
    esac
    if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 11 ]; }; then
        why="$1 is Python $version"
        too_old="${too_old:+$too_old, }$why"
        return 1
    fi
    if ! why=$("$1" -I "$preflight" 2>&1); then
        why="$1: $why"
        platform=$why
        return 1
    fi
}

pick() {
    too_old="" platform=""
    if [ -n "${PYTHON:-}" ]; then
        if passes "$PYTHON"; then
            echo "$PYTHON"
            return 0
        fi
        echo "make: PYTHON=$PYTHON cannot run Pensieve: $why" >&2
        return 1
    fi
    for candidate in python3.13 python3.12 python3.11 python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if passes "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    if command -v uv >/dev/null 2>&1; then
        echo uv
        return 0
    fi
    if [ -n "$platform" ]; then
        echo "make: $platform" >&2
    else
        echo "make: Pensieve needs Python 3.11 or newer${too_old:+ ($too_old)}: install one" \
            "(macOS: brew install python@3.13, or python.org) or uv (docs.astral.sh/uv)," \
            "or name one: make PYTHON=/path/to/python3.13" >&2
    fi
    return 1
}

create() {
    venv=$1
    if [ -e "$venv" ]; then
        if passes "$venv/bin/python"; then
            return 0
        fi
        echo "make: $venv cannot run Pensieve ($why): making it again" >&2
        rm -rf "$venv"
    fi
    python=$(pick) || exit 1
    if [ "$python" = uv ]; then
        echo "make: no Python 3.11+ on PATH; uv venv fetches one" >&2
        uv venv --quiet --seed --python ">=3.11" "$venv"
        if ! passes "$venv/bin/python"; then
            rm -rf "$venv"
            echo "make: $why" >&2
            exit 1
        fi
    else
        echo "make: $venv with $python" >&2
        "$python" -m venv "$venv"
    fi
}

check() {
    if [ -e "$2" ] && ! passes "$1/bin/python"; then
        rm -f "$2"
    fi
}

# M21: `make clean` deletes the venv a LaunchAgent or systemd unit may run;
# launchd would then respawn a missing program every 10 s.
in_use() {
    [ -d "$1" ] || return 0
    for venv in "$(cd "$1" && pwd)" "$(cd "$1" && pwd -P)"; do
        for file in "$HOME/Library/LaunchAgents/dev.pensieve.daemon.plist" \
            "$HOME/.config/systemd/user/pensieve.service"; do
            if [ -f "$file" ] && grep -qF "$venv/bin/pensieved" "$file"; then
                echo "make: warning: the login service $file runs $venv/bin/pensieved," \
                    "which make clean deletes: run make uninstall first" \
                    "(or make install again after)" >&2
                return 0
            fi
        done
    done
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    pick) pick ;;
    create) create "$1" ;;
    check) check "$1" "$2" ;;
    in-use) in_use "$1" ;;
    *) echo "usage: tools/venv.sh pick | create VENV | check VENV STAMP | in-use VENV" >&2; exit 2 ;;
esac
