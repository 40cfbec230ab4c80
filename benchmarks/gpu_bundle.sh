#!/usr/bin/env bash
# Prepares, on a machine with a package index, what benchmarks/gpu_run.sh needs on a GPU machine
# that has none (docs/accelerators.md §6):
#   bash benchmarks/gpu_bundle.sh MLORE_CHECKOUT MTLORA_CHECKOUT
# - benchmarks/wheels/: pure-Python wheels the GPU image lacks (ml_collections for the configs;
#   timm 0.5.4, easydict and termcolor for the original code, which needs timm's 0.5 layout);
# - benchmarks/wheels/pinned/: this repository's flax and optax, used only where the image's own
#   fail the smoke run;
# - benchmarks/reference_code/{mlore,mtlora}: the .py and .yml files of the two checkouts
#   (YuqiYang213/MLoRE, scale-lab/MTLoRA). Both folders are git-ignored: nothing fetched is
#   committed.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 MLORE_CHECKOUT MTLORA_CHECKOUT" >&2; exit 2; }
cd "$(dirname "$0")/.."
for d in "$1/models/transformers" "$2/models"; do
  [ -d "$d" ] || { echo "error: $d not found: pass the MLoRE checkout, then the MTLoRA one" >&2; exit 2; }
done
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --platform any -d "$@"
}
mkdir -p benchmarks/wheels/pinned
pip_download benchmarks/wheels ml_collections==1.1.0 timm==0.5.4 easydict==1.14 termcolor==3.3.0
pip_download benchmarks/wheels/pinned flax==0.12.8 optax==0.2.8
for name in mlore mtlora; do
  src=$([ $name = mlore ] && echo "$1" || echo "$2")
  rm -rf "benchmarks/reference_code/$name"
  (cd "$src" && find . -name '*.py' -o -name '*.yml' -o -name '*.yaml') | while read -r f; do
    mkdir -p "benchmarks/reference_code/$name/$(dirname "$f")"
    cp "$src/$f" "benchmarks/reference_code/$name/$f"
  done
done
du -sh benchmarks/wheels benchmarks/reference_code
echo "ready: run(command='bash benchmarks/gpu_run.sh', carry=['benchmarks/wheels', 'benchmarks/reference_code'])"
