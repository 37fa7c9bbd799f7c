"""Check the JSON of `metake edit --json`: the edits landed and nothing else moved.

Usage: python scripts/check_edit.py RESULT.json [--min-landed K] [--min-gain G]
                                    [--expect-before WORD] [--expect-checks WORD]

An edit *lands* when its greedy after-completion starts with its target. By default every edit
must land; ``--min-landed K`` accepts K of them (the tuned presets trade edit strength for the
damage guards of ``metake tune``, see docs/presets.md). Every edit, landed or not, must raise
P(target | prompt) at least ``--min-gain`` times (10). Exits 1 (with the offending lines) when a
check fails; prints a one-line summary otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys


def request_failures(requests: list[dict], min_landed: int | None, min_gain: float) -> list[str]:
    """Lines naming each edit that missed its target or did not raise its probability enough."""
    failures = []
    missed = [r for r in requests if not r["after"].strip().startswith(r["target_new"])]
    needed = len(requests) if min_landed is None else min_landed
    if len(requests) - len(missed) < needed:
        failures += [
            f"after {r['filled_prompt']!r}: {r['after']!r} != {r['target_new']!r}" for r in missed
        ]
        failures.append(
            f"{len(requests) - len(missed)} of {len(requests)} edits landed, {needed} needed"
        )
    for r in requests:
        before, after = r.get("p_target_before"), r.get("p_target_after")
        if before is not None and after is not None and after < min_gain * before:
            failures.append(
                f"P({r['target_new']!r}) {before:.2e} -> {after:.2e} (< {min_gain:g}x) "
                f"for {r['filled_prompt']!r}"
            )
    return failures


def main() -> int:
    """Read the result file and report failures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument(
        "--min-landed",
        type=int,
        help="edits whose greedy completion must start with the target (all)",
    )
    parser.add_argument(
        "--min-gain", type=float, default=10.0, help="factor every P(target) must rise by (10)"
    )
    parser.add_argument("--expect-before", help="every before-completion starts with this")
    parser.add_argument("--expect-checks", help="every --check completion starts with this")
    args = parser.parse_args()
    with open(args.result, encoding="utf-8") as handle:
        result = json.load(handle)
    failures = request_failures(result["requests"], args.min_landed, args.min_gain)
    for r in result["requests"]:
        if args.expect_before and not r["before"].strip().startswith(args.expect_before):
            failures.append(f"before {r['filled_prompt']!r}: {r['before']!r}")
    for c in result.get("checks", []):
        for when in ("before", "after"):
            if args.expect_checks and not c[when].strip().startswith(args.expect_checks):
                failures.append(f"check {c['prompt']!r} {when}: {c[when]!r}")
    landed = sum(r["after"].strip().startswith(r["target_new"]) for r in result["requests"])
    print(
        f"{len(result['requests'])} request(s), {landed} landed, {len(failures)} failure(s); "
        f"{result['seconds']:.1f} s, peak memory {result['peak_memory_mb']:.0f} MiB"
    )
    for line in failures:
        print("  FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
