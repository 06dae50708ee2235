#!/usr/bin/env bash
set -euo pipefail
printf 'good morning\n' > greeting.txt
