#!/usr/bin/env bash
set -euo pipefail
awk '!seen[$0]++' emails.txt > emails.tmp && mv emails.tmp emails.txt
