#!/usr/bin/env bash
set -euo pipefail
wc -w < poem.txt | tr -d ' ' > words.txt
