#!/usr/bin/env bash
# Installs a Firecracker client nobody here wrote, from PyPI, into its own virtualenv:
# hysn-firecracker-python (its `firecracker.api.Api`: one requests-unixsocket session, a
# resource per Firecracker path). Pinned with its own pins (it pins every dependency).
# tests/tests/firecracker_python.rs drives dormouse's Firecracker API with it. Prints the
# virtualenv's python. Idempotent: an existing virtualenv is reused.
set -euo pipefail

VERSION=1.0.7
VENV=${DORMOUSE_FC_PY_VENV:-$HOME/.cache/dormouse/fc-python-$VERSION}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import firecracker.api' 2>/dev/null; then
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "hysn-firecracker-python==$VERSION" >&2
fi
echo "$VENV/bin/python"
