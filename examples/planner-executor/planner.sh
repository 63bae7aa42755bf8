#!/bin/sh
# The planner: one executor per tool, each with only that tool's audience, for five minutes.
set -eu
here=$(dirname "$0")
"$MAYFLY" delegate --task-id search-1 --agent executor --ttl 5m --audience tool.search \
  -- "$PYTHON" "$here/executor.py" search &
"$MAYFLY" delegate --task-id db-1 --agent executor --ttl 5m --audience tool.db \
  -- "$PYTHON" "$here/executor.py" db &
wait
