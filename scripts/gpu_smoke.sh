#!/usr/bin/env bash
# GPU smoke test (issue 13 item 11): bf16 training, packing isolation under the CUDA attention, MFU,
# generate and export on this machine's GPUs, in under 5 minutes. Exits non-zero on any failure;
# without a CUDA GPU it prints one `skip:` line and exits 0. The checks are in gpu_smoke.py.
#
#   scripts/gpu_smoke.sh                 # on a GPU machine
#   scripts/gpu_smoke.sh --device cpu    # developing the script without a GPU (fp32, proves nothing about GPUs)
#
# Uses the repo's .venv (DEEPFLEET_PYTHON overrides) and this checkout's src/.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DEEPFLEET_PYTHON:-$repo/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "FAIL: no Python at $python (run \`make demo\` to create .venv, or set DEEPFLEET_PYTHON)" >&2
    exit 2
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=30 300 "$python" "$repo/scripts/gpu_smoke.py" "$@"
status=$?
if [[ $status -eq 124 ]]; then
    echo "FAIL: the smoke test took longer than 5 minutes (stopped)"
fi
exit $status
