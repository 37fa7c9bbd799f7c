"""Make a preset written by ``metake tune`` a built-in one.

    python scripts/adopt_preset.py benchmarks/results/tune_smollm2/preset.json smollm2-135m

Replaces the entry NAME of ``src/metake/presets/memit.json`` by the tuned one (its ``match``,
shared values, ``methods`` section and ``tuned`` record with the command that found it); the
built-in entry's statistics settings (``mom2_*``) are kept unless the tuned file sets them.

Refused (unless ``--force``) when the run's ``report.json`` beside the preset shows a method
whose chosen setting barely edits: less than ``--min-efficacy-gain`` points of Eff. over the
unedited model on the dev split (a built-in preset that does not edit would make ``metake edit``
look broken). A chosen setting that edits but breaks a damage guard of the selection rule (no
editing setting of that method met them all) is adopted with a warning, and the broken guards are
recorded in the preset's ``tuned`` section, where ``metake presets`` shows them.
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
    parser.add_argument(
        "--min-efficacy-gain",
        type=float,
        default=10.0,
        help="Eff. points over unedited every chosen method must gain (10)",
    )
    parser.add_argument("--force", action="store_true", help="adopt despite the checks")
    args = parser.parse_args()
    report_path = Path(args.tuned).with_name("report.json")
    problems = check_report(report_path, args.min_efficacy_gain)
    if problems and not args.force:
        raise SystemExit("not adopted (--force to adopt anyway):\n  " + "\n  ".join(problems))
    broken = broken_guards(report_path)
    for method, guards in broken.items():
        print(f"warning: {method}'s chosen setting breaks: {'; '.join(guards)}")
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
    if broken:
        merged["tuned"] = {**merged.get("tuned", {}), "guards_broken": broken}
    presets[args.name] = merged
    PRESETS.write_text(json.dumps(presets, indent=2) + "\n", encoding="utf-8")
    print(f"{PRESETS}: {args.name} is now the tuned preset of {args.tuned}")


def check_report(path: Path, min_gain: float) -> list[str]:
    """What speaks against adopting the run whose report is ``path``: one line per method."""
    if not path.is_file():
        return [f"{path} is missing: cannot check the chosen settings"]
    report = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for method, row in report["chosen"].items():
        base = (row.get("unedited") or report["baseline"])["efficacy"]  # on the row's records
        gain = row["efficacy"] - base
        if gain < min_gain:
            problems.append(f"{method}: Eff. {row['efficacy']:.1f} is only {gain:.1f} points over "
                            f"the unedited {base:.1f} (barely edits)")  # fmt: skip
    return problems


def broken_guards(path: Path) -> dict[str, list[str]]:
    """Per method, the damage guards its chosen setting breaks (methods breaking none: absent)."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text(encoding="utf-8"))
    return {
        method: [v for v in row.get("violations", []) if not v.startswith("does not edit")]
        for method, row in report["chosen"].items()
        if any(not v.startswith("does not edit") for v in row.get("violations", []))
    }


if __name__ == "__main__":
    main()
