#!/usr/bin/env bash
set -euo pipefail
cp original.txt backup.txt
