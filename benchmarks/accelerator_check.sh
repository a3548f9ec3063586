#!/usr/bin/env bash
# The one prepared accelerator check (issue 19, deliverable 5): the Pallas flash kernel
# against reference_attention (forward and gradients, T5 bias, default tiles), flash /
# dot_product (cuDNN) / xla attention TFLOP/s at 1k-8k, and a bf16 base-model train step's
# MFU, all into ONE JSON file. See benchmarks/accelerator_check.py for what each part does.
#
# A session lent a GPU (H100/H200) makes exactly this device-tool call, once:
#
#   run(command="bash benchmarks/accelerator_check.sh", timeout_s=540)
#
# with no carry: the GPU image's python3 has jax (CUDA), flax, optax and orbax, and the
# check needs neither gin, seqio nor TensorFlow (the .py stands in for gin's decorator).
# It ends within about 8 minutes (the attention sweep stops starting rows after 420 s,
# and this script kills Python at 500 s); the JSON ($OUT/accelerator_check.json), the
# profiler trace ($OUT/accelerator_check_trace.tar.gz) and the log ($OUT/accelerator_check.log)
# come back in files_at. Read the JSON's "passed" and each part's "error"; then give_back.
# If a later change makes the check need a wheel, put it in .whl/ (device README) and
# add carry=[".whl"]: this script installs .whl/*.whl into /tmp/site first.
#
# Dry run on CPU (tiny sizes, Pallas in interpret mode), as tests/test_accelerator_check.py
# does:
#
#   bash benchmarks/accelerator_check.sh --cpu /tmp/accelerator_check.json
#   (or ACCEL_CHECK_CPU=1 bash benchmarks/accelerator_check.sh /tmp/accelerator_check.json)
#
# Arguments pass through to the .py: [--cpu] [OUT.json] [--budget_s S] [--parts a,b]. The
# exit code is 0 only when every part passed; the last stdout line is the JSON summary.
# Should the sweep be cut short by the budget (its rows say "skipped"), rerun it alone on
# the still-warm machine: run(command="bash benchmarks/accelerator_check.sh --parts
# attention_tflops --budget_s 480", timeout_s=540); the new JSON replaces the first, so
# copy the first from files_at before.
# Environment: PYTHON (default python3; the dry run here: .venv/bin/python if present),
# ACCEL_CHECK_TIMEOUT_S (default 500).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
[ "${ACCEL_CHECK_CPU:-0}" = "1" ] && cpu=1

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ "$cpu" = 1 ] && [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
if [ "$cpu" = 0 ] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then  # carried wheels
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl || exit 3
fi
export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
if [ "$cpu" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # One CPU device, as on one GPU: device_chip splits the host's peak among fake devices.
  XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' | xargs)"
  # An XLA_FLAGS of blanks is read as a flag file's name: unset it when nothing is left.
  if [ -n "$XLA_FLAGS" ]; then export XLA_FLAGS; else unset XLA_FLAGS; fi
else
  # Room for the sweep's 8k xla rows and the train step beside the other programs' buffers.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
fi

log=/dev/null
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && log="$OUT/accelerator_check.log"
timeout -k 10 "${ACCEL_CHECK_TIMEOUT_S:-500}" "$PYTHON" "$ROOT/benchmarks/accelerator_check.py" "$@" \
  2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "{\"passed\": false, \"error\": \"killed at the ${ACCEL_CHECK_TIMEOUT_S:-500} s limit; the JSON holds the parts that finished\"}"
fi
exit "$rc"
