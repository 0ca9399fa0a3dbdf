#!/usr/bin/env bash
# The one command that runs all of jobgate's tests:
#   1. brings up the real brokers the integration tests need (scripts/brokers.sh:
#      RabbitMQ from Debian's packages and Kafka from the Maven Central jars, fetched
#      on first use; brokers that already answer are reused);
#   2. builds the binaries the integration tests start as child processes;
#   3. runs every unit and integration test of the workspace.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/brokers.sh up all
bash scripts/browser.sh
cargo build --workspace --bins
cargo test --workspace "$@"
