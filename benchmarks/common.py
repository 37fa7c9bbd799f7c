"""What every benchmark script does alike: record its command line, write JSON and a table."""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path
from typing import Any


def command_line() -> str:
    """The command that ran this script, quoted so that it can be pasted into a shell."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_json(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``OUT.json`` (creating the folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2), encoding="utf-8")


def write_table(out: Path, lines: list[str]) -> None:
    """Write the Markdown ``lines`` to ``OUT.md`` and print them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser: the docstring's first paragraph as its description, and a
    ``--help`` that shows every option's default."""
    return argparse.ArgumentParser(
        description=" ".join(doc.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def one_batch_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """Arguments of the scripts that time one batch of zsRE requests (records START..+EDITS)."""
    parser = script_parser(doc)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or .gguf")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_1k.json", help="zsRE file")
    parser.add_argument("--start", type=int, default=500, help="first record of the batch")
    parser.add_argument("--edits", type=int, default=10, help="records edited as one batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    parser.add_argument("--out", default=out, help="writes OUT.json and OUT.md")
    return parser


def heldout_texts(parser: argparse.ArgumentParser, statistics_texts: int, start: int,
                  count: int) -> list[str]:  # fmt: skip
    """Wikipedia intros ``start..start+count`` for a drift measure; a clear error if they overlap
    the first ``statistics_texts`` intros that the key statistics were computed from."""
    from metake.corpus import load_corpus

    if statistics_texts > start:
        parser.error(f"held-out texts from {start} overlap the statistics' first "
                     f"{statistics_texts} texts; raise --heldout-start")  # fmt: skip
    return list(itertools.islice(load_corpus().iter_texts(), start, start + count))


def add_heldout_options(parser: argparse.ArgumentParser) -> None:
    """``--heldout-texts`` and ``--heldout-start``: the Wikipedia intros of a KL drift measure."""
    parser.add_argument("--heldout-texts", type=int, default=16,
                        help="held-out Wikipedia intros for the KL (64 tokens each)")  # fmt: skip
    parser.add_argument("--heldout-start", type=int, default=9000,
                        help="corpus index of the first held-out text (not below the "
                             "statistics' text count)")  # fmt: skip
