#!/usr/bin/env bash
set -euo pipefail
mkdir -p output && echo ok > output/result.txt
