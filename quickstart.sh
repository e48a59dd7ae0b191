#!/usr/bin/env bash
# Sets up .venv (first run only takes ~2 minutes) and analyses the bundled example.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/fxrf analyze examples/tiny_cnn.py:make --input 1,3,32,32 --out out/tiny_cnn.json --plot out/tiny_cnn.png
