#!/usr/bin/env bash
# Show that two checkouts edit identically (for refactorings): the weights every method leaves on
# a tiny random model (scripts/fingerprint_edits.py) and a tiny `metake bench` (seven methods,
# two sequential batches, a saved tiny Llama, six requests), compared field by field without
# timings. No download; about a minute on two cores.
#
#   bash scripts/compare_checkouts.sh OLD_CHECKOUT NEW_CHECKOUT
#   bash scripts/compare_checkouts.sh ../metake-before .
set -euo pipefail
old=$(cd "${1:?usage: compare_checkouts.sh OLD NEW}" && pwd)
new=$(cd "${2:?usage: compare_checkouts.sh OLD NEW}" && pwd)
work=$(mktemp -d)
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$work"' EXIT
echo "work folder: $work" >&2
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$new/src" python - "$new/tests" "$work" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[1])
from tiny_models import tiny_model, tiny_tokenizer
model, tok = tiny_model("llama"), tiny_tokenizer()
model.save_pretrained(f"{sys.argv[2]}/model")
tok.save_pretrained(f"{sys.argv[2]}/model")
people = [("Anna Berg", "Oslo"), ("Carl Dunn", "Lima"), ("Eva Lund", "Rome"),
          ("Ola Nord", "Bern"), ("Per Sand", "Kyiv"), ("Ida Holm", "Riga")]
requests = [{"prompt": "{} lives in", "subject": s, "target_new": c} for s, c in people]
json.dump(requests, open(f"{sys.argv[2]}/requests.json", "w"))
PY
for side in old new; do
  tree=${!side}
  PYTHONPATH="$tree/src" python "$here/fingerprint_edits.py" > "$work/fingerprint_$side.txt" 2>/dev/null
  PYTHONPATH="$tree/src" XDG_CACHE_HOME="$work/cache_$side" python -m metake.cli bench \
    --model "$work/model" --device cpu --dataset requests --data "$work/requests.json" \
    --methods rome,memit,alphaedit,rect,prune,alphaedit_blue,metake --edits 6 --batch-size 3 \
    --seeds 0 --set 'layers=[0,1]' --set mom2_samples=20 --set v_steps=30 --set v_lr=1.0 \
    --set metake_steps=2 --set context_count=2 --set context_length=3 \
    --set mom2_update_weight=1 --fluency-records 2 --drift-texts 4 --out "$work/bench_$side" \
    > "$work/bench_$side.log" 2>&1
done
diff "$work/fingerprint_old.txt" "$work/fingerprint_new.txt" && echo "edited weights: identical"
python - "$work/bench_old/results.json" "$work/bench_new/results.json" <<'PY'
import json, re, sys

def compare(old, new, path, only):
    """Every figure both sides have must be equal; fields only one side has are listed."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            if "second" in key or key in ("command", "versions"):
                continue
            if key not in old or key not in new:
                only.add(re.sub(r"\[\d+\]", "[]", f"{path}/{key}").lstrip("/"))
                continue
            if not compare(old[key], new[key], f"{path}/{key}", only):
                return False
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(
            compare(a, b, f"{path}[{i}]", only) for i, (a, b) in enumerate(zip(old, new)))
    if old != new:
        print(f"tiny bench: {path}: {old!r} != {new!r}")
    return old == new

only = set()
old, new = (json.load(open(p)) for p in sys.argv[1:])
if not compare(old, new, "", only):
    sys.exit("tiny bench: results differ")
print("tiny bench: identical results (per record, perplexity, fluency, curves)")
if only:
    print("fields only one side has (not compared):", ", ".join(sorted(only)[:6]),
          f"(+{len(only) - 6})" if len(only) > 6 else "")
PY
