#!/usr/bin/env bash
set -euo pipefail
sed -i 's/^mode = debug$/mode = release/' settings.ini
