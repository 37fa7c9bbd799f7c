"""What every benchmark script does alike: record its command line, write JSON and a table."""

from __future__ import annotations

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
