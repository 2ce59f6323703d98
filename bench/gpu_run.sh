#!/usr/bin/env bash
# Run the gpu_loader GPU benchmark on a CUDA machine; results (results.json, results.md,
# gpu_bench.log) land in $OUT (default ./gpu_bench_out). Extra arguments go to gpu_bench.py.
#
# The machine's CUDA torch is used as is: this script never installs or replaces torch. Other
# missing packages are installed with torch pinned to the installed build, so pip cannot swap it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_run.sh: $PY has no CUDA-enabled torch; install one matching the driver first, e.g." >&2
  echo "  pip install torch --index-url https://download.pytorch.org/whl/cu124" >&2
  echo "(or run 'python bench/gpu_bench.py --smoke' to check the script on CPU)" >&2
  exit 2
fi

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"triton": "triton", "transformers": "transformers", "safetensors": "safetensors",
        "numpy": "numpy", "zstandard": "zstandard", "pytest": "pytest", "xdist": "pytest-xdist"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  constraints="$OUT/.torch-constraint.txt"
  "$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
  echo "installing: $missing (torch pinned: $(cat "$constraints"))" >&2
  "$PY" -m pip install --quiet -c "$constraints" $missing \
    || echo "gpu_run.sh: pip install of [$missing] failed (offline?); continuing with what is installed" >&2
fi

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
export TRITON_INTERPRET=0  # compiled kernels
"$PY" bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
