#!/usr/bin/env bash
set -euo pipefail
rm temp.log
