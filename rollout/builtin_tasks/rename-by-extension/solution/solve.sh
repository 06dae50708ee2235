#!/usr/bin/env bash
set -euo pipefail
for f in logs/*.txt; do mv "$f" "${f%.txt}.log"; done
