#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: 2.13.0 is the CPU build; a looser requirement can pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test,server,server-test,vision]"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
