"""A model spread by accelerate's device map (here: CPU plus layers offloaded to disk) edits like
the same model on one device; an offloaded edit layer is refused before anything changes."""

from __future__ import annotations

import json

import pytest
import torch
from test_editor import REQUESTS, TEXTS
from tiny_models import tiny_model, tiny_tokenizer

from metake.cli import main
from metake.corpus import TextCorpus
from metake.editor import Editor
from metake.errors import UnsupportedModelError
from metake.models.adapters import get_adapter, input_device
from metake.models.load import load_model, parse_device_map, parse_max_memory
from metake.stats import StatsCache

ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
           "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
           "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
METHODS = ["memit", "alphaedit", "rome", "rect", "prune", "alphaedit_blue", "metake",
           "metake_exact"]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama4"
    tiny_model("llama", seed=3, num_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _edited(model, method, cache) -> dict[int, torch.Tensor]:
    editor = Editor(model, tiny_tokenizer(), method=method, layers=[0, 1], v_steps=3,
                    mom2_samples=20, mom2_update_weight=10.0, context_count=1, context_length=3,
                    metake_steps=2, corpus=TextCorpus.from_texts(TEXTS, name="t"),
                    stats_cache=cache, progress=False)  # fmt: skip
    editor.edit(REQUESTS)
    adapter = get_adapter(model)
    return {layer: adapter.weight(model, layer).detach().clone() for layer in (0, 1)}


@pytest.mark.parametrize("method", METHODS)
def test_dispatched_model_edits_like_one_device(saved, tmp_path, method):
    plain, _ = load_model(str(saved))
    spread, _ = load_model(str(saved), device_map=ON_DISK, offload_folder=tmp_path / "offload")
    assert spread.hf_device_map["model.layers.2"] == "disk"
    assert spread.model.layers[2].mlp.down_proj.weight.is_meta  # really offloaded
    assert input_device(spread) == torch.device("cpu")
    before = {layer: get_adapter(plain).weight(plain, layer).clone() for layer in (0, 1)}
    want = _edited(plain, method, StatsCache(tmp_path / "a"))
    got = _edited(spread, method, StatsCache(tmp_path / "b"))
    assert any(not torch.equal(want[layer], before[layer]) for layer in (0, 1))  # it edited
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-7)
    ids = tiny_tokenizer()("Anna Berg lives in", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(spread(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-6)


def test_offloaded_edit_layer_is_refused_before_any_change(saved, tmp_path):
    spread, _ = load_model(str(saved), device_map={**ON_DISK, "model.layers.1": "disk"},
                           offload_folder=tmp_path / "offload")  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"edit layer\(s\) \[1\] are offloaded"):
        Editor(spread, tiny_tokenizer(), layers=[0, 1], progress=False)
    Editor(spread, tiny_tokenizer(), layers=[0], progress=False)  # layer 0 is in memory


def test_device_map_and_max_memory_parsing(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": "cpu"}') == {"model": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(ON_DISK))
    assert parse_device_map(str(path)) == ON_DISK
    for bad, message in [("everywhere", "none of them"), ("{oops", "malformed JSON"),
                         ("[1, 2]", "JSON object"), ('{"model": true}', "device")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_device_map(bad)
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(ValueError, match="DEVICE=AMOUNT"):
        parse_max_memory("20GiB")
    with pytest.raises(ValueError, match="with --device-map only"):
        load_model("unused", max_memory="0=1GiB")


def test_cli_edit_with_a_device_map(model_dir, tmp_path, capsys):
    folder, corpus = model_dir
    device_map = {**{k: v for k, v in ON_DISK.items() if k != "model.layers.3"}}
    code = main(["edit", "--model", str(folder), "--corpus", str(corpus), "--layers", "0,1",
                 "--device-map", json.dumps(device_map), "--offload-folder", str(tmp_path / "o"),
                 "--subject", "Anna Berg", "--prompt", "{} lives in", "--target", "Oslo",
                 "--set", "v_steps=2", "--samples", "12", "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["requests"][0]["target_new"] == "Oslo"
