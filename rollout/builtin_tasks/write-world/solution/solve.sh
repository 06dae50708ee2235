#!/usr/bin/env bash
set -euo pipefail
echo world > world.txt
