#!/usr/bin/env bash
# Lint and type-check: ruff over the whole tree, mypy over the product code (not tests).
#
# The repository root is the package ``arborl`` (package-dir in pyproject.toml), whatever the
# checkout's folder is called; mypy finds a package by its folder's name, so it is shown the
# checkout through a link named arborl.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
# The link lives under mypy's (ignored) cache so that the cache stays valid between runs.
root=.mypy_cache/package_root
mkdir -p "$root"
ln -sfn "$PWD" "$root/arborl"
MYPYPATH="$root" .venv/bin/mypy -p arborl
