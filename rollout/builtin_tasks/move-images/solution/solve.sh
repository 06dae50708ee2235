#!/usr/bin/env bash
set -euo pipefail
mkdir -p images && mv ./*.png images/
