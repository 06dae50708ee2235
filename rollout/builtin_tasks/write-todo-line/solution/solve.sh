#!/usr/bin/env bash
set -euo pipefail
echo 'buy milk' > todo.txt
