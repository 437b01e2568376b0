#!/usr/bin/env bash
# One imagefolder-jax job on a Cloud TPU pod slice: one process per TPU VM host, all hosts run the
# same command, jax.distributed finds the others by itself (IFJ_DISTRIBUTED=1).
#
#   launch/tpu_pod.sh --name my-v5p --zone us-east5-a --create --accelerator v5p-64 \
#       --runtime v2-alpha-tpuv5 -- train-generator --config configs/generator_imagenet.py \
#       --workdir gs://bucket/gen --config.tokenizer_bundle=gs://bucket/tok/bundle \
#       --config.data.data_dir=gs://bucket/tfds
#   launch/tpu_pod.sh --name my-v5p --zone us-east5-a --dry-run -- sample ...   # print every command
#
# Steps: (1) with --create, request the slice as a queued resource and wait until it is ACTIVE;
# otherwise reuse the existing slice --name; (2) copy this checkout (git archive of HEAD plus
# uncommitted changes to tracked files) to every worker; (3) install it into a venv on every
# worker (skip with --no-install); (4) start the command on --worker=all, each worker logging to
# ~/imagefolder-jax-RUN.log; (5) stream worker 0's log here and return its exit code. Ctrl-C stops
# streaming only; the job keeps running (see its log with --attach RUN).
# Options: --project P, --spot (preemptible capacity), --dir DIR (remote checkout, default
# ~/imagefolder-jax), --run NAME (log name, default a timestamp), --attach RUN (only step 5).
set -euo pipefail

usage() {
  echo "usage: $0 --name NAME --zone ZONE [--create --accelerator TYPE --runtime VERSION [--spot]] [--project P]" \
       "[--dir DIR] [--run NAME] [--no-install] [--dry-run] [--attach RUN] -- VERB [ARGS...]" >&2
  exit 2
}
die() { echo "$0: $*" >&2; exit 2; }

name="" zone="" project="" accelerator="" runtime="" create=0 spot=0 install=1 dry_run=0 attach=""
# shellcheck disable=SC2088  # expanded by the shell on the workers, not here
remote_dir="~/imagefolder-jax"
run="$(date -u +%Y%m%d-%H%M%S)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:-}"; shift 2 ;;
    --zone) zone="${2:-}"; shift 2 ;;
    --project) project="${2:-}"; shift 2 ;;
    --accelerator) accelerator="${2:-}"; shift 2 ;;
    --runtime) runtime="${2:-}"; shift 2 ;;
    --dir) remote_dir="${2:-}"; shift 2 ;;
    --run) run="${2:-}"; shift 2 ;;
    --attach) attach="${2:-}"; shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (the imagefolder-jax command goes after --)" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$attach" || $# -ge 1 ]] || die "no command: put the imagefolder-jax verb and its arguments after --"
if (( create )); then
  [[ -n "$accelerator" ]] || die "--create needs --accelerator (e.g. v5p-64)"
  [[ -n "$runtime" ]] || die "--create needs --runtime (e.g. v2-alpha-tpuv5)"
fi
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must be letters, digits, '.', '_' or '-', got '$run'"

gcloud_common=(--zone="$zone")
[[ -n "$project" ]] && gcloud_common+=(--project="$project")
log="imagefolder-jax-${attach:-$run}.log"

# Runs (or, with --dry-run, prints) one command.
step() {
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() {  # on_workers all|0 COMMAND
  step gcloud compute tpus tpu-vm ssh "$name" "${gcloud_common[@]}" --worker="$1" --command="$2"
}

stream() {
  # Follow worker 0's log until its process writes its exit code, then return that code.
  on_workers 0 "tail -n +1 -F ~/$log & t=\$!; while [ ! -f ~/$log.rc ]; do sleep 5; done; sleep 1; kill \$t; exit \$(cat ~/$log.rc)"
}

if [[ -n "$attach" ]]; then
  stream
  exit $?
fi

# (1) The slice.
if (( create )); then
  create_args=(gcloud compute tpus queued-resources create "$name" "${gcloud_common[@]}" --node-id="$name"
               --accelerator-type="$accelerator" --runtime-version="$runtime")
  (( spot )) && create_args+=(--spot)
  step "${create_args[@]}"
  if (( ! dry_run )); then
    echo "$0: waiting for the queued resource $name to become ACTIVE" >&2
    while true; do
      state="$(gcloud compute tpus queued-resources describe "$name" "${gcloud_common[@]}" --format='value(state.state)')"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $name is $state" ;;
      esac
      sleep 30
    done
  fi
else
  step gcloud compute tpus tpu-vm describe "$name" "${gcloud_common[@]}" --format='value(state)'
fi

# (2) The code: HEAD plus uncommitted changes to tracked files, the same on every worker.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="${TMPDIR:-/tmp}/imagefolder-jax-$run.tar.gz"
if (( dry_run )); then
  echo "git -C $(printf '%q' "$here") ls-files -z | tar -czf $(printf '%q' "$archive") --null -T -"
else
  (cd "$here" && git ls-files -z | tar -czf "$archive" --null -T -)
fi
step gcloud compute tpus tpu-vm scp "$archive" "$name:~/imagefolder-jax.tar.gz" "${gcloud_common[@]}" --worker=all
on_workers all "mkdir -p $remote_dir && tar -xzf ~/imagefolder-jax.tar.gz -C $remote_dir"

# (3) Install (TPU jaxlib from PyPI; nothing else is fetched at run time).
if (( install )); then
  on_workers all "cd $remote_dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

# (4) Start on every worker, detached, each logging to ~/$log and writing its exit code at the end.
inner="IFJ_DISTRIBUTED=1 .venv/bin/python -m imagefolder_jax.cli$(printf ' %q' "$@") > ~/$log 2>&1; echo \$? > ~/$log.rc"
on_workers all "cd $remote_dir && rm -f ~/$log.rc && nohup bash -c $(printf '%q' "$inner") > /dev/null 2>&1 &"

# (5) Process 0 speaks for the job.
if (( dry_run )); then
  stream
  exit 0
fi
echo "$0: started run $run on every worker of $name; streaming worker 0 (Ctrl-C detaches; --attach $run reattaches)" >&2
stream
