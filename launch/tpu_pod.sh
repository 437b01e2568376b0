#!/usr/bin/env bash
# Run the same command on every host of a Cloud TPU pod slice (JAX multi-host: one process per host).
#   launch/tpu_pod.sh my-tpu us-central2-b train-generator --config configs/generator_imagenet.py \
#       --workdir gs://bucket/gen --config.tokenizer_bundle=gs://bucket/tok/bundle --config.data.data_dir=gs://bucket/tfds
# The repository must be at the same path on every host (e.g. cloned by a startup script), with
# `pip install -e . "jax[tpu]"` done. jax.distributed.initialize() runs automatically on TPU pods.
set -euo pipefail
TPU_NAME="$1"; ZONE="$2"; shift 2
REPO_DIR="${REPO_DIR:-~/imagefolder-jax}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && IFJ_DISTRIBUTED=1 .venv/bin/imagefolder-jax$ARGS"
