#!/usr/bin/env bash
# The README's CPU speed tables in one command, each engine alone in its own process, alternated:
#   1. decode and prompt processing against llama.cpp F32 on the three ~600M models (llama_cpp.py;
#      it builds them, llama.cpp and the GGUF files first), batch 1 and 8, contexts 128 and 1024;
#   2. prefill against ONNX Runtime on the corpus exports, and the coexistence figure (compare.py);
#   3. prefill against ONNX Runtime on the ~500M Llama at 128 and 512 tokens.
#
#   bash benchmarks/cpu_speed.sh DIR      # DIR caches models, GGUF files and artifacts; about 1.5 h on 2 cores
#
# ROUNDS (default 3) sets the rounds of every table. Tables print as they finish; JSON goes to DIR.
set -euo pipefail
dir=${1:?usage: bash benchmarks/cpu_speed.sh WORK_DIR}
rounds=${ROUNDS:-3}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$dir"

python "$here/llama_cpp.py" --work-dir "$dir" --schemes f32 --batch 1 8 --contexts 128 1024 --prompts 128 512 \
    --rounds "$rounds" --tokens 16
python "$here/compare.py" --work-dir "$dir" --models llama_a mixtral_a qwen3_moe_a deepseek_v3_a deepseek_v4_a \
    --seq 16 128 --rounds "$rounds" --no-decode --json "$dir/prefill_corpus.json"
python "$here/compare.py" --work-dir "$dir" --models "$dir/llama_500m.onnx" --seq 128 512 --rounds "$rounds" \
    --runs 3 --warmup 1 --min-ms 0 --no-decode --no-coexist --json "$dir/prefill_llama_500m.json"
