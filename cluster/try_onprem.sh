#!/usr/bin/env bash
# cluster-onprem.yaml end to end on this one machine: an SSH server on loopback, `ray up` with the head on
# 127.0.0.1, the smoke study as a Ray job logging to the head's MLflow server, checks of what the server holds,
# `ray down`. Rerun it any time from the checkout's root:  bash cluster/try_onprem.sh
#
# Safe on a shared machine: the "node" is an sshd in its own PID namespace, so the `ray stop` that `ray down`
# (and the start commands) run sees only this cluster's processes, never other Ray instances here; every port
# is a fresh free one on 127.0.0.1; the node's home is a temp folder; the namespace and folder go at the end.
# Env: SMOKE_ARGS (extra study flags), SCREENSHOTS=DIR (MLflow UI screenshots: cluster/screenshot_ui.py),
#      KEEP=1 (keep the temp folder), JOB_TIMEOUT (seconds, default 3600).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/mbib-onprem.XXXXXX)
NODE_HOME=$WORK/home
PY=$(python -c 'import sys; print(sys.executable)')  # the interpreter itself, not a shim: each call counts when busy
say() { echo "[try_onprem $(date +%T)] $*"; }
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ray_pids() { ps -eo pid=,comm= | awk '$2 ~ /^(raylet|gcs_server)$/ {print $1}' | sort; }

NS_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$NS_PID" ]] && kill -0 "$NS_PID" 2>/dev/null; then
    [[ -f $WORK/cluster.yaml && -z "${DOWN_DONE:-}" ]] && timeout 300 ray down -y "$WORK/cluster.yaml" >/dev/null 2>&1 || true
    # the namespace's init is sshd; when it exits the kernel ends every process left in the namespace
    kill "$(ps -o pid= --ppid "$NS_PID")" 2>/dev/null || true
    wait "$NS_PID" 2>/dev/null || true
  fi
  [[ -n "${SENTINEL:-}" ]] && kill "$SENTINEL" 2>/dev/null
  # anything still running from this script's temp folder (only ours carry its unique path)
  for p in $(ps -eo pid=,args= | grep -F -- "$WORK" | grep -v grep | awk '{print $1}'); do kill "$p" 2>/dev/null || true; done
  rm -f "/tmp/ray/cluster-$CLUSTER.state" "/tmp/ray/cluster-$CLUSTER.lock"
  [[ -n "${KEEP:-}" ]] && say "kept $WORK" || rm -rf "$WORK"
  say "exit $rc"
  exit "$rc"
}
CLUSTER=mbib-onprem-try-$$
trap cleanup EXIT INT TERM

# 1. an SSH server (Debian's openssh-server) and rsync, which `ray up` uses for file_mounts
if ! command -v sshd >/dev/null || ! command -v rsync >/dev/null; then
  say "installing openssh-server and rsync"
  apt-get -o DPkg::Lock::Timeout=900 install -y -q openssh-server rsync >/dev/null
fi
mkdir -p "$NODE_HOME" /run/sshd
ssh-keygen -q -t ed25519 -N "" -f "$WORK/id_ed25519"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/host_key"
cp "$WORK/id_ed25519.pub" "$WORK/authorized_keys"
SSH_PORT=$(free_port)
cat > "$WORK/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv HOME=$NODE_HOME
Subsystem sftp internal-sftp
EOF
# the node's login shells find this Python (and its ray, mlflow) first; /etc/profile resets PATH for root
printf 'export PATH=%s:$PATH\n' "$(dirname "$PY"):$(dirname "$(readlink -f "$PY")")" | tee "$NODE_HOME/.profile" > "$NODE_HOME/.bashrc"
# Ray's SSH runner has no port option: a ProxyCommand (no spaces, so rsync's --rsh keeps it whole) reaches ours
printf '#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/%s\ncat <&3 & cat >&3\n' "$SSH_PORT" > "$WORK/proxy"
chmod +x "$WORK/proxy"
unshare --pid --fork --mount-proc /usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2> "$WORK/sshd.log" &
NS_PID=$!
for _ in $(seq 50); do
  ssh -q -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i "$WORK/id_ed25519" \
    -o ProxyCommand="$WORK/proxy" "root@127.0.0.1" true 2>/dev/null && break
  sleep 0.2
done
say "sshd on 127.0.0.1:$SSH_PORT in its own PID namespace; node home $NODE_HOME"

# 2. the cluster file, pointed at this machine with fresh ports
GCS_PORT=$(free_port) DASH_PORT=$(free_port) CLIENT_PORT=$(free_port) AGENT_PORT=$(free_port) MLFLOW_PORT=$(free_port)
# fixed agent ports: with dynamic ones the raylet waits only seconds for the agents' port files (too short on a busy machine)
AGENT_PORTS="--dashboard-agent-grpc-port=$(free_port) --metrics-export-port=$(free_port) --runtime-env-agent-port=$(free_port)"
"$PY" - "$REPO/cluster-onprem.yaml" "$WORK/cluster.yaml" <<EOF
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
c["cluster_name"] = "$CLUSTER"
c["provider"].update(head_ip="127.0.0.1", worker_ips=[])
c["auth"] = {"ssh_user": "root", "ssh_private_key": "$WORK/id_ed25519", "ssh_proxy_command": "$WORK/proxy"}
c["file_mounts"] = {"~/mbib": "$REPO"}
# this machine's Python is shared and already holds every dependency: a pip install -e here would repoint
# everyone's editable mbib, so the node only proves it can import them (the job ships this checkout)
c["setup_commands"] = ['python -c "import ray, mlflow, optuna, torch, mbib"']
ports = {"--port=6379": "--port=$GCS_PORT", "--dashboard-port=8265": "--node-ip-address=127.0.0.1 --dashboard-port=$DASH_PORT --ray-client-server-port=$CLIENT_PORT "
         "--dashboard-agent-listen-port=$AGENT_PORT $AGENT_PORTS --temp-dir=$NODE_HOME/ray --num-cpus=2", "--port 5000": "--port $MLFLOW_PORT --workers 1"}
def fix(cmd):
    for a, b in ports.items():
        cmd = cmd.replace(a, b)
    return cmd
c["head_start_ray_commands"] = [fix(x) for x in c["head_start_ray_commands"]]
yaml.safe_dump(c, open(sys.argv[2], "w"), sort_keys=False)
EOF
OTHERS_BEFORE=$(ray_pids)
say "other Ray instances on this machine before: $(echo $OTHERS_BEFORE | wc -w) raylet/gcs_server processes"
# a sentinel Ray outside the cluster: `ray down` must leave it running
"$PY" -c "import ray, time; ray.init(address='local', num_cpus=0, include_dashboard=False, _temp_dir='$WORK/sentinel')
print('SENTINEL_UP', flush=True); time.sleep(7200)" > "$WORK/sentinel.log" 2>&1 &
SENTINEL=$!
until grep -qx SENTINEL_UP "$WORK/sentinel.log"; do kill -0 $SENTINEL || { cat "$WORK/sentinel.log"; exit 1; }; sleep 1; done
SENTINEL_RAYLET=$(ps -eo pid=,args= | grep -F -- "$WORK/sentinel" | awk '$2 ~ /raylet$/ {print $1}' | head -1)

# 3. ray up
say "ray up (GCS :$GCS_PORT, dashboard :$DASH_PORT, MLflow :$MLFLOW_PORT)"
cd "$REPO"
for try in 1 2 3; do  # on a very busy machine the raylet can time out waiting for its agents: start again
  timeout 900 ray up -y --no-config-cache "$WORK/cluster.yaml" > "$WORK/ray-up.log" 2>&1 && break
  [[ $try == 3 ]] && { tail -40 "$WORK/ray-up.log"; exit 1; }
  say "ray up failed ($(grep -m1 -o 'The current node timed out during startup\|Failed to setup head node' "$WORK/ray-up.log" || echo see ray-up.log)); again"
done
grep -E "Ray runtime started|Local node IP|Useful commands" "$WORK/ray-up.log" | head -3 | sed 's/^/  /'
export RAY_AUTH_TOKEN
RAY_AUTH_TOKEN=$(cat "$NODE_HOME/.ray/auth_token" 2>/dev/null || true)
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break; sleep 2; done
say "MLflow server on the head: $(curl -s "http://127.0.0.1:$MLFLOW_PORT/health")"

# 4. the smoke study as a Ray job against the cluster
say "submitting the smoke study"
timeout "${JOB_TIMEOUT:-3600}" ray job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir "$REPO" -- \
  python studies/cifar_grid.py --smoke ${SMOKE_ARGS:-} --storage-path "$NODE_HOME/runs" \
  --tracking-uri "http://127.0.0.1:$MLFLOW_PORT" > "$WORK/job.log" 2>&1 || { tail -60 "$WORK/job.log"; exit 1; }
grep -E "trials \(|registered|succeeded|SUCCEEDED" "$WORK/job.log" | sed 's/^/  /'

# 5. what the MLflow server holds (the smoke study's experiment is named after the data it trained on)
say "checking the MLflow server"
EXPERIMENT=$(PYTHONPATH=$REPO "$PY" -c "from mbib.study.cli import smoke_datasets, smoke_name; print(smoke_name(smoke_datasets()))")
"$PY" "$REPO/cluster/check_mlflow.py" "http://127.0.0.1:$MLFLOW_PORT" "$EXPERIMENT"
if [[ -n "${SCREENSHOTS:-}" ]]; then
  PYTHONPATH=$REPO "$PY" "$REPO/cluster/screenshot_ui.py" "http://127.0.0.1:$MLFLOW_PORT" "$EXPERIMENT" "$SCREENSHOTS"
fi

# 6. ray down: its `ray stop` runs inside the namespace, so only this cluster stops
say "ray down"
timeout 300 ray down -y "$WORK/cluster.yaml" > "$WORK/ray-down.log" 2>&1
DOWN_DONE=1
left=$(ps -eo pid=,args= | grep -F -- "$NODE_HOME/ray" | grep -vc grep || true)
alive=0; for p in $OTHERS_BEFORE; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
sentinel=dead; kill -0 "$SENTINEL_RAYLET" 2>/dev/null && sentinel=running
say "after ray down: $left processes of this cluster left; sentinel Ray $sentinel; other Ray instances:" \
    "$alive of $(echo $OTHERS_BEFORE | wc -w) still running"
kill "$SENTINEL"; wait "$SENTINEL" 2>/dev/null || true
[[ -n "$SENTINEL_RAYLET" && "$left" == 0 && "$sentinel" == running ]]
say "PASS"
