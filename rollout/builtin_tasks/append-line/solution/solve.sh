#!/usr/bin/env bash
set -euo pipefail
echo third >> notes.txt
