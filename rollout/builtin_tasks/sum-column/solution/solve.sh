#!/usr/bin/env bash
set -euo pipefail
awk -F, 'NR > 1 { s += $2 } END { print s }' sales.csv > total.txt
