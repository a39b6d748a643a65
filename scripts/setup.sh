#!/usr/bin/env bash
# Creates .venv and installs captioner into it. `--test` adds the test extras, the ray extra (its tests run in CI)
# and the Chromium browser test needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
# torch first and pinned to the release on this machine's disk (pip takes it from there), never a newer one.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
if [[ "${1:-}" == "--test" ]]; then extras=".[test,ray]"; else extras="."; fi
.venv/bin/python -m pip install -q -e "$extras"
.venv/bin/python -c "import captioner, torch; print('captioner ready, torch', torch.__version__)"
