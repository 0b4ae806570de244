#!/usr/bin/env bash
# The peer of `yuebing bench peer`: `transformers serve` in a virtualenv of its own, so that its
# serving dependencies (fastapi, uvicorn, openai, ...) never enter the product's .venv.
#
#   bench/peer_env.sh [DIR]      # default DIR: .venv-peer at the repository root
#
# Pinned to what .venv runs: torch 2.13.0 (the CPU build pip finds on PyPI here) and the same
# transformers version as .venv (read from it when .venv exists, else TRANSFORMERS_VERSION below),
# with the `serving` extras. Re-running it on an existing DIR only (re)installs those pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.venv-peer}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-}"

if [ -z "$TRANSFORMERS_VERSION" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    TRANSFORMERS_VERSION="$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))')"
fi
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"

if [ ! -x "$DIR/bin/python" ]; then
    "$PYTHON" -m venv "$DIR"
    "$DIR/bin/python" -m pip install --quiet --upgrade pip
fi
# torch first and pinned (as the Makefile does for .venv), then transformers with its serving extras
"$DIR/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$DIR/bin/python" -m pip install --quiet "transformers[serving]==$TRANSFORMERS_VERSION"
HF_HUB_OFFLINE=1 "$DIR/bin/transformers" serve --help >/dev/null
echo "peer env ready: $DIR (torch $TORCH_VERSION, transformers[serving] $TRANSFORMERS_VERSION)"
