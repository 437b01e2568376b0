#!/usr/bin/env bash
# N processes of one job on this machine: a workstation with several GPUs, or CPU devices for tests.
#   launch/local.sh 2 train-tokenizer --config configs/tokenizer_tiny.py:nogan --workdir runs/tok
#   IFJ_LOCAL_DEVICES=2 launch/local.sh 2 sample --bundle B --classes all --per-class 50 --out-dir runs/samples
# Process 0 hosts the coordinator on 127.0.0.1 at a free port. Each process gets its share of the
# GPUs (CUDA_VISIBLE_DEVICES) when nvidia-smi sees any, else IFJ_LOCAL_DEVICES CPU devices (default 1).
# Waits for all; when one fails, the others are stopped and its exit code is returned.
# Python: $IFJ_PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES VERB [ARGS...]   (see imagefolder-jax --help)" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
num="$1"; shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_PROCESSES must be a positive integer, got '$num'" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${IFJ_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
port="${IFJ_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
grace="${IFJ_KILL_GRACE:-10}"   # seconds between SIGTERM and SIGKILL for the survivors

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if (( gpus > 0 && gpus % num != 0 )); then
  echo "$0: $gpus GPUs cannot be split evenly over $num processes" >&2; exit 2
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq "$grace"); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  env_args=(IFJ_COORDINATOR="127.0.0.1:$port" IFJ_NUM_PROCESSES="$num" IFJ_PROCESS_ID="$i")
  if (( gpus > 0 )); then
    per=$((gpus / num))
    env_args+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * per)) $((i * per + per - 1)))")
  else
    env_args+=(JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
               XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${IFJ_LOCAL_DEVICES:-1}")
  fi
  if (( i == 0 )); then
    env "${env_args[@]}" "$python" -m imagefolder_jax.cli "$@" &
  else
    # Other processes' lines are prefixed with their id; process 0 speaks for the job.
    env "${env_args[@]}" "$python" -m imagefolder_jax.cli "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  fi
  pids+=("$!")
done

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  set +e
  wait -n -p done_pid "${live[@]}"
  code=$?
  set -e
  next=()
  for pid in "${live[@]}"; do [[ "$pid" != "${done_pid:-}" ]] && next+=("$pid"); done
  live=("${next[@]}")
  if (( code != 0 )); then
    who="?"
    for ((i = 0; i < num; i++)); do [[ "${pids[$i]}" == "${done_pid:-}" ]] && who=$i; done
    echo "$0: process $who exited with code $code; stopping the others" >&2
    status=$code
    stop_all
    break
  fi
done
wait 2>/dev/null || true
exit "$status"
