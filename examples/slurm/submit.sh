#!/usr/bin/env bash
# Submit the whole batch: the subspace job (when BASE is set), then an array of SHARDS sanitize tasks that
# starts once it succeeded. Set the variables of sanitize-array.sbatch and subspace.sbatch first, e.g.
#
#   export ADAPTERS_DIR=/shared/adapters ALIGNED=/shared/models/llama-chat BASE=/shared/models/llama \
#          OUT_DIR=/shared/sanitized CACHE_DIR=/shared/csulora-cache SHARDS=8
#   bash examples/slurm/submit.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
shards=${SHARDS:-4}
dependency=()
if [ -n "${BASE:-}" ]; then
  job=$(sbatch --parsable --export=ALL "$here/subspace.sbatch")
  dependency=(--dependency="afterok:${job%%;*}")  # --parsable prints "id" or "id;cluster"
fi
sbatch --export=ALL --array="1-$shards" ${dependency[@]+"${dependency[@]}"} "$here/sanitize-array.sbatch"
