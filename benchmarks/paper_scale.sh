#!/usr/bin/env bash
# The paper's scale (issue 17): thousands of sequential edits in batches of 100, one seed, with
# metrics-versus-edits curves (a fixed sample of the edited records scored after every batch,
# so the run stays linear; the final scores cover every edited record) and generation-based
# success rates beside the teacher-forced scores.
#
#   bash benchmarks/paper_scale.sh DATASET [MODEL] [OUT]
#   bash benchmarks/paper_scale.sh counterfact smollm2-135m benchmarks/results/scale_counterfact_smollm2
#   bash benchmarks/paper_scale.sh zsre smollm2-135m benchmarks/results/scale_zsre_smollm2
#
# counterfact: 2,000 records of ../shared/data/counterfact/counterfact_10k.json sampled with seed
#   0, never from records 0:5000 (the known-facts probe below; 0:2000 also gave `metake tune`'s).
# zsre: records 0:900 of ../shared/data/zsre/zsre_1k.json in file order (9 batches): the other
#   100 (900:1000) are the dev split the presets were tuned on, so they are left out.
# Both watch the known facts of CounterFact records 2000:5000 (never edited here, and outside
# the 0:2000 whose facts `metake tune` chose the presets by): the share the
# unedited model answers that is still answered, after every batch and at the end.
# Environment: METHODS (default memit,alphaedit,alphaedit_blue,metake,metake_exact), DEVICE
# (auto), SEED (0), PROBE (the CounterFact file of those facts; "none": no probe). Each method is a resumable part: re-running with an existing OUT continues
# it (finished methods are kept; an interrupted one restarts from its last checkpointed batch).
# `metake bench --progress OUT` prints what has finished. Writes OUT/results.md (the table, with
# the command), results.json, the metrics-versus-edits plots and bench.log.
set -euo pipefail
dataset=${1:?usage: paper_scale.sh DATASET [MODEL] [OUT]}
model=${2:-smollm2-135m}
out=${3:-benchmarks/results/scale_${dataset}_${model}}
methods=${METHODS:-memit,alphaedit,alphaedit_blue,metake,metake_exact}
if [[ -f "$out/config.json" ]]; then
  exec metake bench --resume "$out"
fi
probe=${PROBE:-../shared/data/counterfact/counterfact_10k.json}
common=(--model "$model" --device "${DEVICE:-auto}" --batch-size 100 --methods "$methods"
        --seeds "${SEED:-0}" --out "$out")
if [[ "$probe" != none ]]; then
  common+=(--probe-data "$probe" --probe-records 2000:5000)
fi
case "$dataset" in
  counterfact)
    exec metake bench "${common[@]}" --dataset counterfact \
      --data "${DATA:-../shared/data/counterfact/counterfact_10k.json}" --edits 2000 --exclude 0:5000 ;;
  zsre)
    exec metake bench "${common[@]}" --dataset zsre \
      --data "${DATA:-../shared/data/zsre/zsre_1k.json}" --edits 900 --records 0:900 ;;
  *)
    echo "paper_scale.sh: DATASET must be counterfact or zsre, got '$dataset'" >&2
    exit 2 ;;
esac
