#!/usr/bin/env bash
# The MetaKE paper's Table 1 on one model: ROME, MEMIT, PRUNE, RECT, AlphaEdit, AlphaEdit+BLUE
# and MetaKE (over AlphaEdit), zsRE, sequential editing, mean ± std over seeds.
#
#   bash benchmarks/table1.sh MODEL [SEEDS] [OUT]
#   bash benchmarks/table1.sh smollm2-135m 0,1,2 benchmarks/results/table1_zsre_smollm2
#   bash benchmarks/table1.sh gemma3-270m 0 benchmarks/results/table1_zsre_gemma3
#
# Environment: DATA (zsRE file, default ../shared/data/zsre/zsre_1k.json), EDITS (100),
# BATCH (25), DEVICE (auto), METHODS (default table1,metake_exact: the seven rows and MetaKE with
# the exact hypergradient), PROBE (CounterFact file whose records PROBE_RECORDS, default
# 2000:5000, give the known facts watched for damage: outside the 0:2000 whose facts
# `metake tune` chose the presets by), default
# ../shared/data/counterfact/counterfact_10k.json; "none": no probe),
# EXCLUDE (records never sampled, default 900:1000: the dev split the
# built-in presets were tuned on by `metake tune`). Re-running with an existing OUT resumes it (finished parts are
# kept, an interrupted method restarts from its last checkpointed batch). Writes OUT/results.md
# (the table, with the command above it), results.json, plots and bench.log.
set -euo pipefail
model=${1:?usage: table1.sh MODEL [SEEDS] [OUT]}
seeds=${2:-0,1,2}
out=${3:-benchmarks/results/table1_zsre_${model}}
data=${DATA:-../shared/data/zsre/zsre_1k.json}
if [[ -f "$out/config.json" ]]; then
  exec metake bench --resume "$out"
fi
probe=${PROBE:-../shared/data/counterfact/counterfact_10k.json}
probe_args=()
if [[ "$probe" != none ]]; then
  probe_args=(--probe-data "$probe" --probe-records "${PROBE_RECORDS:-2000:5000}")
fi
exec metake bench --model "$model" --device "${DEVICE:-auto}" --dataset zsre --data "$data" \
  --edits "${EDITS:-100}" --batch-size "${BATCH:-25}" --methods "${METHODS:-table1,metake_exact}" \
  --seeds "$seeds" --exclude "${EXCLUDE:-900:1000}" "${probe_args[@]}" --out "$out"
