#!/usr/bin/env bash
# Set up a Python environment for lightning-attn from nothing; idempotent and quick when done.
#
#  - Inside an activated virtualenv or conda env, installs into it (its torch stays).
#  - Otherwise creates .venv (seeing system site-packages, so a system torch stays too).
#  - Installs torch FIRST, only if none is importable: an unpinned torch requirement with no
#    torch present would pull the newest CUDA build (gigabytes). Override with TORCH_SPEC,
#    e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
#  - Then installs this project (editable) with its dev extra.
#  - Then the real timm and torchvision model code the tests build, without dependencies
#    (below: why), each only if it is not importable yet.
# Prints nothing on stdout but the path of the Python to use (last line).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# torchvision 0.16.2 has wheels for Python 3.8-3.11; with another Python (or to match your own
# torch) set TORCHVISION_SPEC, e.g. TORCHVISION_SPEC="torchvision==0.28.0".
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.16.2}
TIMM_SPEC=${TIMM_SPEC:-timm==1.0.31}
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
# A change to either file installs again.
stamp="$stamp_dir/.lightning-attn-installed-$(cat pyproject.toml scripts/bootstrap.sh | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "installing $TORCH_SPEC" >&2
        # shellcheck disable=SC2086
        "$PY" -m pip install --disable-pip-version-check -q $TORCH_SPEC >&2
    fi
    echo "installing lightning-attn and its dependencies" >&2
    "$PY" -m pip install --disable-pip-version-check -q -e ".[dev]" >&2
    # The tests build real timm and torchvision models (random init; nothing downloads at
    # run time). They cannot be dev-extra lines: torchvision pins one exact torch, so pip
    # would replace the torch chosen above (the CPU build, or your CUDA build) to satisfy it,
    # and timm depends on torchvision. So both go in with --no-deps (timm's other
    # dependencies are in the dev extra). torchvision 0.16.2's Python model code imports
    # beside newer torch; its compiled ops (image decoding, nms) do not load, which building
    # models does not need. Each is skipped when importable, so a torchvision that matches
    # your torch stays.
    if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
        echo "installing $TORCHVISION_SPEC (--no-deps, model code for the tests)" >&2
        "$PY" -m pip install --disable-pip-version-check -q --no-deps "$TORCHVISION_SPEC" >&2
    fi
    if ! "$PY" -c "import timm" >/dev/null 2>&1; then
        echo "installing $TIMM_SPEC (--no-deps, model code for the tests)" >&2
        "$PY" -m pip install --disable-pip-version-check -q --no-deps "$TIMM_SPEC" >&2
    fi
    touch "$stamp"
fi
echo "$PY"
