#!/usr/bin/env bash
# Start a local Ray head with its dashboard / job server on 127.0.0.1, as `ray start --block` in
# its own session, so that ray-head-down.sh stops it by PID (`ray stop` would end every Ray
# process on the machine). Usage: RAY_VENV=.venv cluster/ray-head-up.sh  (prints the address)
set -euo pipefail
venv="$(cd "${RAY_VENV:-.venv}" && pwd)"
# This user's own folder (short: Ray's AF_UNIX socket paths must stay under 108 bytes). Its pid
# file decides what ray-head-down.sh kills, so a folder someone else owns or can write is refused.
state="${RAY_STATE_DIR:-/tmp/cifarcam-ray-$(id -u)}"
cpus="${RAY_NUM_CPUS:-$(nproc)}"
gcs_port="${RAY_GCS_PORT:-6380}"
dash_port="${RAY_DASHBOARD_PORT:-8266}"
(umask 077 && mkdir -p "$state")
if [[ ! -O "$state" ]] || [[ -n "$(find "$state" -maxdepth 0 -perm /022)" ]]; then
  echo "error: $state: not this user's own private folder; remove it or set RAY_STATE_DIR" >&2
  exit 2
fi
# cifarcam's Ray environment (cifarcam/ray_env.py), values set here kept: RAY_AUTH_MODE=token
# among them (clients need the same setting and ~/.ray/auth_token)
ray_env="$("$venv/bin/python" -m cifarcam.ray_env)"  # an assignment of its own: set -e stops here if it fails
eval "$ray_env"
# job entrypoints resolve `python` from the head's PATH: the project's venv first
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
# RAY_ADDRESS: Ray's own clients inside the cluster (Ray Train's PlacementGroupCleaner) ask this
# head, not another cluster on this host.
RAY_ADDRESS="127.0.0.1:$gcs_port" setsid "$venv/bin/ray" start --head --block --num-cpus="$cpus" --node-ip-address=127.0.0.1 \
  --port="$gcs_port" --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" \
  --object-store-memory=$((512 * 1024 * 1024)) --disable-usage-stats --temp-dir="$state/ray" \
  </dev/null >"$state/head.log" 2>&1 &
echo $! >"$state/head.pid"
# Ray 2.59+ protects local clusters with a token (~/.ray/auth_token); the API wants it too. The
# header goes to curl in a private file (-H @file), never on a command line where ps shows it.
header="$state/api-header"
rm -f "$header"  # written afresh from the token this head uses
api() {
  [[ -s "$header" ]] || { [[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]] &&
    (umask 077 && printf 'Authorization: Bearer %s\n' "$(<"${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}")" >"$header"); }
  local auth=()  # none where RAY_AUTH_MODE=disabled left no token
  [[ -s "$header" ]] && auth=(-H @"$header")
  curl -sf "${auth[@]}" "http://127.0.0.1:$dash_port$1"
}
for _ in $(seq 600); do
  if api /api/jobs/ >/dev/null 2>&1 && api /api/v0/nodes 2>/dev/null | grep -q '"state": *"ALIVE"'; then
    echo "http://127.0.0.1:$dash_port"; exit 0
  fi
  kill -0 "$(cat "$state/head.pid")" 2>/dev/null || break
  sleep 0.1
done
echo "ray head did not come up; see $state/head.log" >&2
tail -20 "$state/head.log" >&2
exit 1
