#!/usr/bin/env bash
set -euo pipefail
mv draft.md final.md
