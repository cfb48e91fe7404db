#!/usr/bin/env bash
# Run the train command as NUM_PROCESSES processes on this machine (127.0.0.1), each with its
# own virtual CPU devices: the same multi-process code path as a TPU pod or a GPU cluster.
#
#   launch/local.sh NUM_PROCESSES [train flags...]
#   launch/local.sh 2 --config=configs/pretrain.py:tiny --workdir=runs/two_procs
#
# Environment (all optional):
#   MLM_VS_CLM_CPU_DEVICES   virtual CPU devices per process (default 4)
#   MLM_VS_CLM_PORT          coordinator port (default: a free port)
#   MLM_VS_CLM_INIT_TIMEOUT_S  seconds to wait for every process to join (default 300)
#   PYTHON                   interpreter (default: the repo's .venv/bin/python, else python3)
#   MODULE                   module to run with -m (default mlm_vs_clm.train)
#
# Waits for every process; if one fails, the others are stopped and its exit status is
# returned. Ctrl-C / SIGTERM are forwarded to every process (the train loop saves a
# checkpoint on SIGTERM).
set -euo pipefail

usage="usage: launch/local.sh NUM_PROCESSES [train flags...]"
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
num_processes=$1
shift

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then PYTHON="$repo_root/.venv/bin/python"; else PYTHON=python3; fi
fi
module="${MODULE:-mlm_vs_clm.train}"
port="${MLM_VS_CLM_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

export JAX_PLATFORMS=cpu
export MLM_VS_CLM_CPU_DEVICES="${MLM_VS_CLM_CPU_DEVICES:-4}"
export MLM_VS_CLM_COORDINATOR="127.0.0.1:$port"
export MLM_VS_CLM_NUM_PROCESSES="$num_processes"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM

for ((i = 0; i < num_processes; i++)); do
  MLM_VS_CLM_PROCESS_ID=$i "$PYTHON" -m "$module" "$@" &
  pids+=("$!")
done

status=0
finished=0
while ((finished < num_processes)); do
  rc=0
  pid=""
  wait -n -p pid || rc=$?
  if [[ -z "${pid:-}" ]]; then
    continue  # the wait was cut short by a signal we forwarded: no process has exited yet
  fi
  finished=$((finished + 1))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
