#!/usr/bin/env bash
# One command for a GPU / TPU host: parity tests at float32 'highest' matmul precision, then the speed
# table of bench/device_check.py (d17 sampling latency/throughput in float32 and bf16, tokenizer
# encode/decode, one training step's MFU for the generator at d16 and the tokenizer).
#
#   bench/device_check.sh            # on the accelerator
#   bench/device_check.sh --smoke    # tiny sizes on a CPU (checks the script; JAX_PLATFORMS=cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then SMOKE="--smoke"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== parity (float32, jax_default_matmul_precision=highest)"
# Every test that checks our numbers against the official parity fixture or the official torch modules.
PARITY=(tests/models/test_tokenizer.py tests/models/test_generator.py)
if [[ -n "$SMOKE" ]]; then PARITY=(tests/models/test_tokenizer.py); fi
JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -m pytest -q -p no:cacheprovider "${PARITY[@]}" 2>&1 | tail -3

echo "== speed"
"$PYTHON" bench/device_check.py $SMOKE
