"""Fingerprints of the weights every method leaves on a tiny random model: run it on two
checkouts to show that a refactoring changed no result (bit-identical weights).

    PYTHONPATH=OLD/src python scripts/fingerprint_edits.py > before.txt
    PYTHONPATH=NEW/src python scripts/fingerprint_edits.py > after.txt
    diff before.txt after.txt      # no output: identical edits

Two sequential batches per method (RECT, PRUNE's finalize, AlphaEdit's key cache and MetaKE's
look-ahead all take part); statistics from a few fixed texts, cached in a temporary folder.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

from metake import Editor  # noqa: E402
from metake.corpus import TextCorpus  # noqa: E402
from metake.stats import StatsCache  # noqa: E402

TEXTS = ["The river runs through the old town and meets the sea.",
         "A small library opened near the station last spring."] * 10  # fmt: skip
REQUESTS = [
    {"prompt": "{} lives in", "subject": "Anna Berg", "target_new": "Oslo"},
    {"prompt": "The home of {} is", "subject": "Carl Dunn", "target_new": "Lima"},
]
CASES = [("rome", None), ("memit", None), ("alphaedit", None), ("rect", None), ("prune", None),
         ("alphaedit_blue", None), ("memit_rect_prune", None), ("metake", "alphaedit"),
         ("metake", "memit"), ("metake_exact", "alphaedit")]  # fmt: skip


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) over every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for _, value in sorted(model.state_dict().items()):
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    """Print one line per method: its name, solver and the edited weights' fingerprint."""
    with tempfile.TemporaryDirectory() as stats:
        for method, solver in CASES:
            model = tiny_model("llama")
            editor = Editor(model, tiny_tokenizer(), method, solver=solver, layers=[0, 1],
                            v_steps=4, mom2_samples=20, mom2_update_weight=10.0, context_count=2,
                            context_length=3, metake_steps=2, progress=False,
                            corpus=TextCorpus.from_texts(TEXTS, name="fingerprint texts"),
                            stats_cache=StatsCache(stats))  # fmt: skip
            editor.edit(REQUESTS[:1])
            editor.edit(REQUESTS[1:])
            editor.finalize()
            print(method, solver or "-", fingerprint(model))


if __name__ == "__main__":
    main()
