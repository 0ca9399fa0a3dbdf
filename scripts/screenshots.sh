#!/usr/bin/env bash
# Makes the console screenshots of the README (docs/screenshots/*.png): runs the
# console's RabbitMQ browser tests, which save queues.png, job.png and dead-letters.png
# when JOBGATE_SCREENSHOTS_DIR is set. Real brokers, a real producer and consumer, and
# headless Chromium at 1280x800, as in any test run.
#
#   scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."

dir="$PWD/docs/screenshots"
mkdir -p "$dir"
started=$(mktemp -t jobgate-screenshots.XXXXXX) # its mtime: when this run started
trap 'rm -f "$started"' EXIT
JOBGATE_SCREENSHOTS_DIR="$dir" bash scripts/test.sh console::rabbitmq
mapfile -t written < <(find "$dir" -maxdepth 1 -name '*.png' -newer "$started" | sort)
if ((${#written[@]} == 0)); then
  printf 'screenshots: ERROR: the tests wrote no screenshot to %s\n' "$dir" >&2
  exit 1
fi
printf 'screenshots: wrote\n'
ls -l "${written[@]}"
