#!/usr/bin/env bash
# A real OpenSearch node without containers: start [--nodes N] [--port P] | stop | status | fetch.
# See "A node without containers" in docker/README.md; the work is done by opensearch-node/opensearch_node.py.
set -euo pipefail
if ! command -v python3 >/dev/null 2>&1; then
  echo "opensearch-node: error: python3 not found" >&2
  exit 3
fi
exec python3 "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/opensearch-node/opensearch_node.py" "$@"
