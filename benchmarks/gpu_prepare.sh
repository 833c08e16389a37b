#!/usr/bin/env bash
# Here, before a lent GPU call: stage in .gpu/ (git-ignored; it travels as carry) what the
# one call needs and the device image lacks (the device tool's KINDS.md lists its packages): wheels of
# the versions tested here for its Python 3.12, the base model's config and tokenizer (no
# weights: the benchmarks build random ones), and the two peer recipes from ../shared.
# Then, one call: run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=590).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/base .gpu/peers
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "data/models/base/$f" ] && cp "data/models/base/$f" .gpu/base/
done
[ -f .gpu/base/config.json ] || { echo "data/models/base/config.json missing: run \`ptune stage base_model --out data/models/base\` first" >&2; exit 1; }
cp ../shared/peers/peft_trainer_recipe.py ../shared/peers/peft_trainer_tuned_recipe.py .gpu/peers/
# Not in the image, or older there than this project needs (transformers 5.25 wants
# huggingface_hub 2.x, which talks through httpx2); --no-deps: the image has the rest.
pkgs=(transformers tokenizers huggingface_hub httpx2 httpcore2 truststore peft pydantic pydantic_core
      typing_inspection annotated_types typing_extensions regex idna)
pins=()
for p in "${pkgs[@]}"; do pins+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${pins[@]}"
echo "staged: ${pins[*]}"
du -sh .gpu
