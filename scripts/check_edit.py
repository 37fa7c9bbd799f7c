"""Check the JSON of `metake edit --json`: every after-completion starts with its target.

Usage: python scripts/check_edit.py RESULT.json [--expect-before WORD] [--expect-checks WORD]
Exits 1 (with the offending lines) when a check fails; prints a one-line summary otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    """Read the result file and report failures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("--expect-before", help="every before-completion starts with this")
    parser.add_argument("--expect-checks", help="every --check completion starts with this")
    args = parser.parse_args()
    with open(args.result, encoding="utf-8") as handle:
        result = json.load(handle)
    failures = []
    for r in result["requests"]:
        if not r["after"].strip().startswith(r["target_new"]):
            failures.append(f"after {r['filled_prompt']!r}: {r['after']!r} != {r['target_new']!r}")
        if args.expect_before and not r["before"].strip().startswith(args.expect_before):
            failures.append(f"before {r['filled_prompt']!r}: {r['before']!r}")
    for c in result.get("checks", []):
        for when in ("before", "after"):
            if args.expect_checks and not c[when].strip().startswith(args.expect_checks):
                failures.append(f"check {c['prompt']!r} {when}: {c[when]!r}")
    print(
        f"{len(result['requests'])} request(s), {len(failures)} failure(s); "
        f"{result['seconds']:.1f} s, peak memory {result['peak_memory_mb']:.0f} MiB"
    )
    for line in failures:
        print("  FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
