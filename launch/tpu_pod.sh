#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice (v4, v5p, ...): create or reuse the slice, copy this
# checkout to every worker, install, and run the train command on all workers at once.
#
#   TPU_NAME=enc-1b ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 \
#     launch/tpu_pod.sh --config=configs/pretrain.py:1b,clm50_mlm40 \
#       --workdir=gs://my-bucket/runs/1b-clm50 [--config.train.steps=...]
#
# Every argument is passed to `python -m mlm_vs_clm.train` on every worker. Use a workdir
# that every worker sees (a gs:// bucket or a shared mount). JAX detects the coordinator,
# the process count and the process ids of a slice itself (mlm_vs_clm.distributed).
# Running the same command again resumes from the newest checkpoint in the workdir.
#
# Variables (environment):
#   TPU_NAME          name of the TPU VM slice (required)
#   ZONE              its zone (required)
#   ACCELERATOR_TYPE  e.g. v5p-128, v4-64 (required to create a slice; ignored for an existing one)
#   RUNTIME_VERSION   TPU VM software version (default v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base otherwise)
#   PROJECT           gcloud project (default: gcloud's configured project)
#   SPOT              1: create a Spot (preemptible) slice
#   CODE              'copy' (default): rsync/scp this checkout; or a git URL to clone on each worker
#   GIT_REF           branch/commit to check out when CODE is a git URL (default main)
#   REMOTE_DIR        checkout directory on the workers (default ~/mlm_vs_clm)
#   SKIP_INSTALL      1: do not (re)install the package on the workers
#   JAX_TPU_SPEC      pip requirement for JAX on TPU (default 'jax[tpu]')
#   DRY_RUN           1: print the gcloud commands instead of running them
#   SKIP_AOT_CHECK    1: do not compile the train step for the slice before starting it (below)
#   AOT_TOPOLOGY      topology for that check, e.g. v5p:4x4x4 (default: from ACCELERATOR_TYPE)
#
# Before anything is created or copied, the train step is compiled here, on this machine, for the
# slice's chips (`python -m mlm_vs_clm.aot --platform=tpu --topology=...`, needs libtpu:
# `pip install -e '.[tpu]'`), with the same flags: a config that does not fit the chips' memory,
# or does not split over the mesh, stops the launch before any TPU time is spent.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR_TYPE=...] launch/tpu_pod.sh --config=... --workdir=... [flags...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME (the TPU VM slice to create or reuse)}"
: "${ZONE:?set ZONE (the zone of the slice)}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# 0. Does the step compile and fit on these chips? (local, no TPU needed)
aot_topology() {  # v5p-128 -> v5p:4x4x4 (chips = cores / 2 on v4/v5p), v5litepod-16 -> v5e:4x4, v6e-64 -> v6e:8x8
  local type="$1" gen n
  gen="${type%%-*}"; n="${type##*-}"
  case "$gen" in
    v5p|v4) n=$((n / 2)) ;;
    v5litepod) gen=v5e ;;
  esac
  case "$gen:$n" in
v5e:4|v6e:4) echo "$gen:2x2" ;; v5e:8|v6e:8) echo "$gen:2x4" ;;
    v5e:16|v6e:16) echo "$gen:4x4" ;; v5e:32|v6e:32) echo "$gen:4x8" ;; v5e:64|v6e:64) echo "$gen:8x8" ;;
    v5e:128|v6e:128) echo "$gen:8x16" ;; v5e:256|v6e:256) echo "$gen:16x16" ;;
    *:4) echo "$gen:2x2x1" ;; *:8) echo "$gen:2x2x2" ;; *:16) echo "$gen:2x2x4" ;; *:32) echo "$gen:2x4x4" ;;
    *:64) echo "$gen:4x4x4" ;; *:128) echo "$gen:4x4x8" ;; *:256) echo "$gen:4x8x8" ;; *:512) echo "$gen:8x8x8" ;;
    *) return 1 ;;
  esac
}
if [[ "${SKIP_AOT_CHECK:-0}" != "1" ]]; then
  topology="${AOT_TOPOLOGY:-}"
  if [[ -z "$topology" ]]; then
    topology="$(aot_topology "${ACCELERATOR_TYPE:-}")" || {
      echo "tpu_pod.sh: cannot tell the topology of ACCELERATOR_TYPE='${ACCELERATOR_TYPE:-}'; set AOT_TOPOLOGY (e.g. v5p:4x4x4) or SKIP_AOT_CHECK=1" >&2
      exit 2
    }
  fi
  aot_args=()
  for arg in "$@"; do  # the train flags the check understands: --config and its overrides
    case "$arg" in --config=*|--config.*) aot_args+=("$arg") ;; esac
  done
  echo "tpu_pod.sh: compiling the train step for $topology here (SKIP_AOT_CHECK=1 skips this)"
  (cd "$repo_root" && TPU_SKIP_MDS_QUERY=1 "${PYTHON:-python3}" -m mlm_vs_clm.aot --platform=tpu \
    --topology="$topology" "${aot_args[@]}") || {
    echo "tpu_pod.sh: the AOT check failed for $topology (above); not launching" >&2
    exit 1
  }
fi
remote_dir="${REMOTE_DIR:-mlm_vs_clm}"
code="${CODE:-copy}"
jax_tpu_spec="${JAX_TPU_SPEC:-jax[tpu]}"
gcloud_common=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gcloud_common+=(--project="$PROJECT"); fi

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_common[@]}" --worker=all --command="$1"
}

# 1. Create the slice unless it exists.
if gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_common[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing slice $TPU_NAME in $ZONE"
else
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5p-128) to create slice $TPU_NAME}"
  case "$ACCELERATOR_TYPE" in
    v5p-*) default_runtime=v2-alpha-tpuv5 ;;
    v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
    *) default_runtime=tpu-ubuntu2204-base ;;
  esac
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_common[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-$default_runtime}")
  if [[ "${SPOT:-0}" == "1" ]]; then create+=(--spot); fi
  echo "tpu_pod.sh: creating slice $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE"
  run "${create[@]}"
fi

# 2. Code on every worker.
if [[ "$code" == "copy" ]]; then
  archive="$(mktemp -t mlm_vs_clm.XXXXXX.tar.gz)"
  trap 'rm -f "$archive"' EXIT
  # Tracked and untracked-but-not-ignored files: no venv, caches or runs.
  (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard |
    tar --null -czf "$archive" -T -)
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/mlm_vs_clm.tar.gz" "${gcloud_common[@]}" --worker=all
  tpu_ssh "mkdir -p $remote_dir && tar -xzf /tmp/mlm_vs_clm.tar.gz -C $remote_dir"
else
  ref="${GIT_REF:-main}"
  tpu_ssh "if [ -d $remote_dir/.git ]; then git -C $remote_dir fetch -q origin; else git clone -q $(printf '%q' "$code") $remote_dir; fi && git -C $remote_dir checkout -q $(printf '%q' "$ref") && { git -C $remote_dir pull -q --ff-only || true; }"
fi

# 3. Install (a virtual environment per worker).
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  tpu_ssh "cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . $(printf '%q' "$jax_tpu_spec")"
fi

# 4. Train on every worker; JAX detects the slice (MLM_VS_CLM_DISTRIBUTED=auto).
train_args=""
for arg in "$@"; do train_args+=" $(printf '%q' "$arg")"; done
tpu_ssh "cd $remote_dir && MLM_VS_CLM_DISTRIBUTED=auto PYTHONUNBUFFERED=1 .venv/bin/python -m mlm_vs_clm.train$train_args"
