#!/usr/bin/env bash
# scripts/test.sh — the test suite, as CI runs it: setup, lint, types, tests.
# Root tests run (CI is root); a skipped test fails the run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "== ruff"
.venv/bin/ruff check agent bpf netns tests scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
NODEMESH_FAIL_ON_SKIP=1 exec .venv/bin/pytest -p no:cacheprovider -rs "$@"
