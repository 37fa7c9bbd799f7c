"""Make a preset written by ``metake tune`` a built-in one.

    python scripts/adopt_preset.py benchmarks/results/tune_smollm2/preset.json smollm2-135m

Replaces the entry NAME of ``src/metake/presets/memit.json`` by the tuned one (its ``match``,
shared values, ``methods`` section and ``tuned`` record with the command that found it); the
built-in entry's statistics settings (``mom2_*``) are kept unless the tuned file sets them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = Path(__file__).resolve().parent.parent / "src" / "metake" / "presets" / "memit.json"


def main() -> None:
    """Merge the tuned entry into the built-in presets file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuned", help="preset.json written by metake tune")
    parser.add_argument("name", help="built-in preset to replace, e.g. smollm2-135m")
    args = parser.parse_args()
    tuned = {k: v for k, v in json.loads(Path(args.tuned).read_text()).items() if k[0] != "_"}
    if len(tuned) != 1:
        raise SystemExit(f"{args.tuned}: expected one preset entry, found {len(tuned)}")
    entry = next(iter(tuned.values()))
    presets = json.loads(PRESETS.read_text(encoding="utf-8"))
    old = presets.get(args.name, {})
    kept = {k: v for k, v in old.items() if k.startswith("mom2_") and k not in entry}
    merged = {"match": old.get("match", entry["match"]), **kept}
    merged.update({k: v for k, v in entry.items() if k != "match"})
    merged.pop("experimental", None)
    presets[args.name] = merged
    PRESETS.write_text(json.dumps(presets, indent=2) + "\n", encoding="utf-8")
    print(f"{PRESETS}: {args.name} is now the tuned preset of {args.tuned}")


if __name__ == "__main__":
    main()
