#!/usr/bin/env bash
# Stop the head started by ray-head-up.sh: SIGTERM its process group (setsid: PGID == PID).
set -uo pipefail
state="${RAY_STATE_DIR:-/tmp/cifarcam-ray-$(id -u)}"
[[ -s "$state/head.pid" ]] || exit 0
[[ -O "$state/head.pid" ]] || { echo "error: $state/head.pid: not this user's; not killing what it names" >&2; exit 2; }
pid=$(cat "$state/head.pid")
kill -TERM -- "-$pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -KILL -- "-$pid" 2>/dev/null
rm -f "$state/head.pid" "$state/api-header"
exit 0
