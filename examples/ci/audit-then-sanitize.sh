#!/usr/bin/env bash
# The gate before publishing LoRA adapters: audit every adapter under a folder against thresholds; if any
# exceeds them, fail (exit 1) and sanitize nothing; otherwise sanitize each one into OUT_DIR.
#
#   ADAPTERS_DIR  a folder of adapters (each subfolder with an adapter_config.json), or one adapter folder
#   SUBSPACE      a subspace pack (docs/packs.md): Hub id org/name@revision, or a folder; with ALIGNED and BASE
#                 set and no pack in that folder yet, it is built there first (cache the folder between runs).
#                 With a pack, no checkpoint is downloaded.
#   ALIGNED       the safety-aligned checkpoint: local folder or Hub id org/name[@revision] (without SUBSPACE, or
#                 to build the pack)
#   BASE          the pretrained checkpoint (without SUBSPACE optional: from the adapter config / aligned card)
#   SUBSPACE_OPTIONS  the subspace rule the pack is built with (default: --subspace-rank 8)
#   CSULORA_OPTIONS   method options for the audit and sanitize runs, e.g. "--lambda 8" (default: none)
#   OUT_DIR       where the sanitized adapters and the audit JSON go (default: ./sanitized)
#   MIN_EROSION   the gate's threshold on the erosion coefficient, e.g. -0.113 (docs/audit.md: measured on the
#                 shipped worlds, it passed 32 % of harmful fine-tunes; calibrate it on adapters you trust)
#   MAX_OFF_ENERGY, MAX_LAYER_OFF_ENERGY, MIN_SAFE_LORA_SCORE   other thresholds (docs/audit.md: on the shipped
#                 worlds they fail benign adapters before harmful ones); empty = not checked
#   CSULORA       the command to run (default: csulora)
#
# Exit codes: 0 all adapters passed and were sanitized; 1 a threshold was exceeded; 2 bad input.
set -euo pipefail

: "${ADAPTERS_DIR:?set ADAPTERS_DIR}"
[ -n "${SUBSPACE:-}" ] || : "${ALIGNED:?set SUBSPACE (a pack) or ALIGNED}"
OUT_DIR=${OUT_DIR:-sanitized}
read -r -a csulora <<< "${CSULORA:-csulora}"
read -r -a method <<< "${CSULORA_OPTIONS:-}"

adapters=()
if [ -f "$ADAPTERS_DIR/adapter_config.json" ]; then
  adapters=("$ADAPTERS_DIR")
else
  for config in "$ADAPTERS_DIR"/*/adapter_config.json; do
    [ -e "$config" ] && adapters+=("$(dirname "$config")")
  done
fi
if [ ${#adapters[@]} -eq 0 ]; then
  echo "no adapter (a folder with adapter_config.json) under $ADAPTERS_DIR" >&2
  exit 2
fi

if [ -n "${SUBSPACE:-}" ]; then
  # 0. The pack: built once from the checkpoints when it is not there yet, else taken as it is (docs/packs.md).
  if [ ! -f "$SUBSPACE/csulora_subspace.json" ] && [ -n "${ALIGNED:-}" ] && [ -n "${BASE:-}" ]; then
    read -r -a rule <<< "${SUBSPACE_OPTIONS:---subspace-rank 8}"
    "${csulora[@]}" subspace --aligned "$ALIGNED" --base "$BASE" "${rule[@]}" -o "$SUBSPACE" --quiet
  fi
  common=(--subspace "$SUBSPACE" "${method[@]}")
else
  common=(--aligned "$ALIGNED" "${method[@]}")
  [ -n "${BASE:-}" ] && common+=(--base "$BASE")
fi
gate=()
[ -n "${MIN_EROSION:-}" ] && gate+=(--min-erosion "$MIN_EROSION")
[ -n "${MAX_OFF_ENERGY:-}" ] && gate+=(--max-off-energy "$MAX_OFF_ENERGY")
[ -n "${MAX_LAYER_OFF_ENERGY:-}" ] && gate+=(--max-layer-off-energy "$MAX_LAYER_OFF_ENERGY")
[ -n "${MIN_SAFE_LORA_SCORE:-}" ] && gate+=(--min-safe-lora-score "$MIN_SAFE_LORA_SCORE")

mkdir -p "$OUT_DIR"
audit_args=()
for a in "${adapters[@]}"; do audit_args+=(--adapter "$a"); done

# 1. The gate: the JSON verdict is kept as an artifact; the one-line reason goes to the job log (stderr).
status=0
"${csulora[@]}" audit "${audit_args[@]}" "${common[@]}" "${gate[@]}" --json --quiet > "$OUT_DIR/audit.json" || status=$?
if [ "$status" -ne 0 ]; then
  echo "audit failed (exit $status): nothing sanitized; see $OUT_DIR/audit.json" >&2
  exit "$status"
fi
echo "audit passed for ${#adapters[@]} adapter(s)"

# 2. Sanitize each adapter (report, model card and csulora_report.html in each output folder).
for a in "${adapters[@]}"; do
  "${csulora[@]}" sanitize --adapter "$a" "${common[@]}" -o "$OUT_DIR/$(basename "$a")" --force --quiet
done
