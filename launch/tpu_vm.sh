#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, copy and install this project on every worker,
# run workshop-train on all workers at once (logs stream here), delete the slice at the end.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: ${0##*/} --zone ZONE --accelerator-type TYPE --config FILE --workdir DIR [options] [--] [section.field=value ...]

Creates a TPU VM slice, installs this project on all its workers, runs
  workshop-train --config FILE --workdir DIR [overrides]
on every worker (JAX finds the other workers by itself), streams the logs here and deletes
the slice when done (or on failure / Ctrl-C) unless --keep is given.

Required (flag, or environment variable):
  --zone ZONE                 TPU_ZONE              e.g. us-west4-a
  --accelerator-type TYPE     TPU_ACCELERATOR_TYPE  e.g. v5litepod-16, v6e-16, v5p-32, v4-32
  --config FILE               WORKSHOP_CONFIG       relative to the project root, or absolute on the workers
  --workdir DIR               WORKSHOP_WORKDIR      shared by all workers and restarts (e.g. a gcsfuse mount)

Options:
  --name NAME                 TPU_NAME              TPU VM name (default: workshop-\$USER)
  --project PROJECT           TPU_PROJECT           Google Cloud project (default: gcloud's)
  --version VERSION           TPU_VERSION           TPU software version (default: by accelerator family:
                                                    v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                                                    v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                      TPU_SPOT=1            Spot capacity (cheaper, can be preempted)
  --max-restarts N            TPU_MAX_RESTARTS      After a preemption, recreate the slice and resume from the
                                                    latest checkpoint in the workdir, up to N times (default 0)
  --skip-create               TPU_SKIP_CREATE=1     Use an existing TPU VM called NAME (implies --keep)
  --skip-setup                TPU_SKIP_SETUP=1      Do not copy or install the project (already there)
  --keep                      TPU_KEEP=1            Do not delete the TPU VM at the end
  --source DIR                WORKSHOP_SOURCE       Project to copy (default: this repository)
  --python VERSION            WORKSHOP_PYTHON       Python for the workers' virtualenv (default 3.11)
  --setup-command CMD         WORKSHOP_SETUP_COMMAND  Replace the default install command on the workers
  --dry-run                                         Print the exact commands instead of running them
  -h, --help                                        Show this help

Example:
  ${0##*/} --zone us-west4-a --accelerator-type v5litepod-16 --spot --max-restarts 3 \\
    --config configs/vae_digits.yaml --workdir /gcs/my-bucket/runs/vae -- mesh.data=1 mesh.fsdp=-1
EOF
}

DEFAULT_USER=${USER:-tpu}
DEFAULT_USER=$(printf %s "$DEFAULT_USER" | tr "[:upper:]" "[:lower:]")
NAME=${TPU_NAME:-workshop-${DEFAULT_USER//[^a-z0-9-]/-}}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
VERSION=${TPU_VERSION:-}
SPOT=${TPU_SPOT:-0}
MAX_RESTARTS=${TPU_MAX_RESTARTS:-0}
SKIP_CREATE=${TPU_SKIP_CREATE:-0}
SKIP_SETUP=${TPU_SKIP_SETUP:-0}
KEEP=${TPU_KEEP:-0}
CONFIG=${WORKSHOP_CONFIG:-}
WORKDIR=${WORKSHOP_WORKDIR:-}
SOURCE=${WORKSHOP_SOURCE:-$(dirname "$SCRIPT_DIR")}
PYTHON=${WORKSHOP_PYTHON:-3.11}
SETUP_COMMAND=${WORKSHOP_SETUP_COMMAND:-}
OVERRIDES=()

while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name) need_value "$1" $#; NAME=$2; shift ;;
    --zone) need_value "$1" $#; ZONE=$2; shift ;;
    --project) need_value "$1" $#; PROJECT=$2; shift ;;
    --accelerator-type) need_value "$1" $#; ACCELERATOR_TYPE=$2; shift ;;
    --version) need_value "$1" $#; VERSION=$2; shift ;;
    --spot) SPOT=1 ;;
    --max-restarts) need_value "$1" $#; MAX_RESTARTS=$2; shift ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --keep) KEEP=1 ;;
    --source) need_value "$1" $#; SOURCE=$2; shift ;;
    --python) need_value "$1" $#; PYTHON=$2; shift ;;
    --setup-command) need_value "$1" $#; SETUP_COMMAND=$2; shift ;;
    --config) need_value "$1" $#; CONFIG=$2; shift ;;
    --workdir) need_value "$1" $#; WORKDIR=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option $1; see --help" ;;
    *=*) OVERRIDES+=("$1") ;;
    *) die "unexpected argument '$1': overrides look like section.field=value; see --help" ;;
  esac
  shift
done

require "$ZONE" --zone TPU_ZONE
require "$ACCELERATOR_TYPE" --accelerator-type TPU_ACCELERATOR_TYPE
require "$CONFIG" --config WORKSHOP_CONFIG
require "$WORKDIR" --workdir WORKSHOP_WORKDIR
non_negative_int "$MAX_RESTARTS" --max-restarts
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' must be lowercase letters, digits and dashes"
if [[ -z $VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default TPU software version for '$ACCELERATOR_TYPE': pass --version" ;;
  esac
fi
if [[ $SKIP_CREATE == 1 ]]; then
  KEEP=1
fi
if [[ $SKIP_SETUP != 1 && $DRY_RUN != 1 && ! -f $SOURCE/pyproject.toml ]]; then
  die "--source '$SOURCE' is not a project directory (no pyproject.toml)"
fi

LOCATION=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then
  LOCATION+=(--project="$PROJECT")
fi
ARCHIVE=${TMPDIR:-/tmp}/$NAME-source.tgz
REMOTE_ARCHIVE=workshop-source.tgz
if [[ -z $SETUP_COMMAND ]]; then
  SETUP_COMMAND="set -e; rm -rf ~/workshop ~/workshop-venv; mkdir -p ~/workshop;"
  SETUP_COMMAND+=" tar -xzf ~/$REMOTE_ARCHIVE -C ~/workshop;"
  SETUP_COMMAND+=" python3 -m pip install --user --quiet --upgrade uv; export PATH=\$HOME/.local/bin:\$PATH;"
  SETUP_COMMAND+=" uv venv --quiet --python $(quote "$PYTHON") ~/workshop-venv;"
  SETUP_COMMAND+=" uv pip install --quiet --python ~/workshop-venv/bin/python 'jax[tpu]' ~/workshop"
fi
TRAIN_COMMAND="cd ~/workshop && ~/workshop-venv/bin/workshop-train $(quote_all --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")"
SPOT_FLAG=()
if [[ $SPOT == 1 ]]; then
  SPOT_FLAG=(--spot)
fi

create_vm() {
  step "create the TPU VM slice $NAME ($ACCELERATOR_TYPE, $VERSION)"
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${SPOT_FLAG[@]}"
}

setup_workers() {
  [[ $SKIP_SETUP == 1 ]] && return 0
  step "copy the project to every worker"
  run tar -czf "$ARCHIVE" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' -C "$SOURCE" .
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:$REMOTE_ARCHIVE" "${LOCATION[@]}" --worker=all
  step "install it (with jax[tpu]) on every worker"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$SETUP_COMMAND"
}

train() {
  step "train on all workers; logs stream here"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$TRAIN_COMMAND"
}

delete_vm() {
  step "delete the TPU VM slice $NAME"
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
}

vm_state() {
  gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || echo UNKNOWN
}

if [[ $DRY_RUN == 1 ]]; then
  [[ $SKIP_CREATE == 1 ]] || create_vm
  setup_workers
  train
  if ((MAX_RESTARTS > 0)); then
    step "if the slice was preempted (state PREEMPTED), up to $MAX_RESTARTS times: delete, create, copy," \
      "install and train again; training resumes from the latest checkpoint in $WORKDIR"
  fi
  [[ $KEEP == 1 ]] || delete_vm
  exit 0
fi

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  [[ $KEEP == 1 ]] || delete_vm || true
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $SKIP_CREATE == 1 ]] || create_vm
setup_workers
restarts=0
until train; do
  code=$?
  state=$(vm_state)
  if [[ $state != PREEMPTED ]] || ((restarts >= MAX_RESTARTS)); then
    printf '%s: training failed with exit code %s (TPU VM state: %s)\n' "${0##*/}" "$code" "$state" >&2
    exit "$code"
  fi
  restarts=$((restarts + 1))
  step "slice preempted: restart $restarts of $MAX_RESTARTS, resuming from the latest checkpoint in $WORKDIR"
  delete_vm
  create_vm
  setup_workers
done
step "training finished"
