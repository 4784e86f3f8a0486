#!/usr/bin/env bash
# Set up a Python environment for lightning-attn from nothing; idempotent and quick when done.
#
#  - Inside an activated virtualenv or conda env, installs into it (its torch stays).
#  - Otherwise creates .venv (seeing system site-packages, so a system torch stays too).
#  - Installs torch FIRST, only if none is importable: an unpinned torch requirement with no
#    torch present would pull the newest CUDA build (gigabytes). Override with TORCH_SPEC,
#    e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
#  - Then installs this project (editable) with its dev extra.
# Prints nothing on stdout but the path of the Python to use (last line).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    PY="$CONDA_PREFIX/bin/python"
else
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv" >&2
        python3 -m venv --system-site-packages .venv >&2
    fi
    PY="$PWD/.venv/bin/python"
fi

stamp_dir=$("$PY" -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.lightning-attn-installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "installing $TORCH_SPEC" >&2
        # shellcheck disable=SC2086
        "$PY" -m pip install --disable-pip-version-check -q $TORCH_SPEC >&2
    fi
    echo "installing lightning-attn and its dependencies" >&2
    "$PY" -m pip install --disable-pip-version-check -q -e ".[dev]" >&2
    touch "$stamp"
fi
echo "$PY"
