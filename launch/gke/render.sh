#!/usr/bin/env bash
# Fill launch/gke/jobset.yaml for a TPU or GPU node pool and apply it with kubectl.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$SCRIPT_DIR/../lib.sh"
TEMPLATE=$SCRIPT_DIR/jobset.yaml

usage() {
  cat <<EOF
Usage: ${0##*/} --platform tpu|gpu --accelerator-type TYPE --image IMAGE --config FILE --workdir DIR [options] [--] [section.field=value ...]

Renders a JobSet (launch/gke/jobset.yaml) running the image's entrypoint
  workshop-train --config FILE --workdir DIR [overrides]
on NUM_NODES pods, then applies it with kubectl. The JobSet controller must be installed in
the cluster. With --dry-run the manifest is printed, followed by the kubectl command.

Required (flag, or environment variable):
  --platform tpu|gpu          GKE_PLATFORM
  --accelerator-type TYPE     GKE_ACCELERATOR_TYPE  node label value: tpu-v5-lite-podslice, tpu-v6e-slice,
                                                    nvidia-h100-80gb, ...
  --topology AxB              GKE_TOPOLOGY          TPU slice topology, e.g. 4x4 (TPU only)
  --image IMAGE               WORKSHOP_IMAGE        built from docker/Dockerfile.tpu or .gpu
  --config FILE               WORKSHOP_CONFIG       path inside the container
  --workdir DIR               WORKSHOP_WORKDIR      must outlive pods: a shared volume (Filestore, GCS FUSE)

Options:
  --name NAME                 JOBSET_NAME           JobSet name (default: workshop-train)
  --num-nodes N               GKE_NUM_NODES         pods = TPU VM hosts or GPU nodes (default 1)
  --chips-per-node N          GKE_CHIPS_PER_NODE    google.com/tpu or nvidia.com/gpu per pod (default 4 TPU, 8 GPU)
  --max-restarts N            GKE_MAX_RESTARTS      JobSet restarts after failure/preemption (default 10)
  --grace-seconds N           GKE_GRACE_SECONDS     time to save a checkpoint after SIGTERM (default 120)
  --port PORT                 GKE_COORDINATOR_PORT  JAX coordinator port (default 8482)
  --data-dir DIR              GKE_DATA_DIR          WORKSHOP_DATA_DIR in the pods (default /data)
  --namespace NS              GKE_NAMESPACE         kubectl namespace (default: kubectl's current)
  --output FILE                                     also write the manifest to FILE and apply that file
  --dry-run                                         print the manifest and the kubectl command only
  -h, --help                                        show this help
EOF
}

NAME=${JOBSET_NAME:-workshop-train}
PLATFORM=${GKE_PLATFORM:-}
ACCELERATOR_TYPE=${GKE_ACCELERATOR_TYPE:-}
TOPOLOGY=${GKE_TOPOLOGY:-}
NUM_NODES=${GKE_NUM_NODES:-1}
CHIPS_PER_NODE=${GKE_CHIPS_PER_NODE:-}
MAX_RESTARTS=${GKE_MAX_RESTARTS:-10}
GRACE_SECONDS=${GKE_GRACE_SECONDS:-120}
PORT=${GKE_COORDINATOR_PORT:-8482}
DATA_DIR=${GKE_DATA_DIR:-/data}
NAMESPACE=${GKE_NAMESPACE:-}
IMAGE=${WORKSHOP_IMAGE:-}
CONFIG=${WORKSHOP_CONFIG:-}
WORKDIR=${WORKSHOP_WORKDIR:-}
OUTPUT=
OVERRIDES=()

while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name) need_value "$1" $#; NAME=$2; shift ;;
    --platform) need_value "$1" $#; PLATFORM=$2; shift ;;
    --accelerator-type) need_value "$1" $#; ACCELERATOR_TYPE=$2; shift ;;
    --topology) need_value "$1" $#; TOPOLOGY=$2; shift ;;
    --num-nodes) need_value "$1" $#; NUM_NODES=$2; shift ;;
    --chips-per-node) need_value "$1" $#; CHIPS_PER_NODE=$2; shift ;;
    --max-restarts) need_value "$1" $#; MAX_RESTARTS=$2; shift ;;
    --grace-seconds) need_value "$1" $#; GRACE_SECONDS=$2; shift ;;
    --port) need_value "$1" $#; PORT=$2; shift ;;
    --data-dir) need_value "$1" $#; DATA_DIR=$2; shift ;;
    --namespace) need_value "$1" $#; NAMESPACE=$2; shift ;;
    --image) need_value "$1" $#; IMAGE=$2; shift ;;
    --config) need_value "$1" $#; CONFIG=$2; shift ;;
    --workdir) need_value "$1" $#; WORKDIR=$2; shift ;;
    --output) need_value "$1" $#; OUTPUT=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option $1; see --help" ;;
    *=*) OVERRIDES+=("$1") ;;
    *) die "unexpected argument '$1': overrides look like section.field=value; see --help" ;;
  esac
  shift
done

require "$PLATFORM" --platform GKE_PLATFORM
case $PLATFORM in
  tpu)
    require "$TOPOLOGY" --topology GKE_TOPOLOGY
    [[ $TOPOLOGY =~ ^[0-9]+(x[0-9]+)+$ ]] || die "--topology must look like 2x4 or 4x4x4, got '$TOPOLOGY'"
    CHIPS_PER_NODE=${CHIPS_PER_NODE:-4}
    ;;
  gpu) CHIPS_PER_NODE=${CHIPS_PER_NODE:-8} ;;
  *) die "--platform must be tpu or gpu, got '$PLATFORM'" ;;
esac
require "$ACCELERATOR_TYPE" --accelerator-type GKE_ACCELERATOR_TYPE
require "$IMAGE" --image WORKSHOP_IMAGE
require "$CONFIG" --config WORKSHOP_CONFIG
require "$WORKDIR" --workdir WORKSHOP_WORKDIR
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be at most 40 lowercase letters, digits and dashes (it prefixes pod host names)"
positive_int "$NUM_NODES" --num-nodes
positive_int "$CHIPS_PER_NODE" --chips-per-node
non_negative_int "$MAX_RESTARTS" --max-restarts
non_negative_int "$GRACE_SECONDS" --grace-seconds
positive_int "$PORT" --port

# A string as a double-quoted YAML (= JSON) scalar.
yaml_string() {
  local value=${1//\\/\\\\}
  printf '"%s"' "${value//\"/\\\"}"
}

ARGS="[$(yaml_string --config), $(yaml_string "$CONFIG"), $(yaml_string --workdir), $(yaml_string "$WORKDIR")"
for override in "${OVERRIDES[@]}"; do
  ARGS+=", $(yaml_string "$override")"
done
ARGS+="]"

# Strings go inside the template's double quotes: escape them the same way, minus the quotes.
inner() {
  local quoted
  quoted=$(yaml_string "$1")
  quoted=${quoted#\"}
  printf '%s' "${quoted%\"}"
}
PLACEHOLDERS=(NAME MAX_RESTARTS NUM_NODES GRACE_SECONDS PORT CHIPS_PER_NODE ARGS ACCELERATOR_TYPE TOPOLOGY IMAGE DATA_DIR)
VALUES=("$NAME" "$MAX_RESTARTS" "$NUM_NODES" "$GRACE_SECONDS" "$PORT" "$CHIPS_PER_NODE" "$ARGS"
  "$(inner "$ACCELERATOR_TYPE")" "$(inner "$TOPOLOGY")" "$(inner "$IMAGE")" "$(inner "$DATA_DIR")")

render() {
  local line keep drop i
  if [[ $PLATFORM == tpu ]]; then
    keep='  # only:tpu' drop='  # only:gpu'
  else
    keep='  # only:gpu' drop='  # only:tpu'
  fi
  shopt -u patsub_replacement 2>/dev/null || true # bash 5.2: '&' in a value stays '&'
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line == *"$drop" ]] && continue
    line=${line%"$keep"}
    for i in "${!PLACEHOLDERS[@]}"; do
      line=${line//"\${${PLACEHOLDERS[i]}}"/"${VALUES[i]}"}
    done
    printf '%s\n' "$line"
  done <"$TEMPLATE"
}

MANIFEST=$(render)
# shellcheck disable=SC2016 # a literal '${' is what we look for
if [[ $MANIFEST == *'${'* ]]; then
  die "unfilled placeholder in $TEMPLATE: $(grep -o '\${[A-Z_]*}' <<<"$MANIFEST" | sort -u | tr '\n' ' ')"
fi

KUBECTL=(kubectl apply)
if [[ -n $NAMESPACE ]]; then
  KUBECTL+=(--namespace="$NAMESPACE")
fi
KUBECTL+=(-f "${OUTPUT:--}")

if [[ $DRY_RUN == 1 ]]; then
  printf '%s\n' "$MANIFEST"
  printf '# would run: %s\n' "$(quote_all "${KUBECTL[@]}")"
  exit 0
fi
if [[ -n $OUTPUT ]]; then
  printf '%s\n' "$MANIFEST" >"$OUTPUT"
  run "${KUBECTL[@]}"
else
  printf '%s\n' "$MANIFEST" | run "${KUBECTL[@]}"
fi
cat >&2 <<EOF
JobSet $NAME submitted. Follow it with:
  kubectl get jobset $NAME${NAMESPACE:+ --namespace=$NAMESPACE}
  kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$NAME${NAMESPACE:+ --namespace=$NAMESPACE} --max-log-requests=64 --prefix
EOF
