#!/usr/bin/env bash
set -euo pipefail
echo $(( $(wc -l < data.csv) - 1 )) > count.txt
