"""Evaluation: metrics on hand-built numbers, dataset loading and sampling, scoring a model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA
from tiny_models import MODEL_TYPES, tiny_model, tiny_tokenizer

from metake.errors import MetakeError
from metake.evaluation.datasets import (
    DatasetError,
    EvalRecord,
    data_path,
    load_dataset,
    sample_records,
)
from metake.evaluation.evaluate import evaluate_records, mean_metrics, specificity
from metake.evaluation.metrics import (
    AnswerScore,
    compare_answers,
    encode_pair,
    ngram_entropy,
    perplexity_of,
    score_pairs,
    text_perplexity,
    token_accuracy_of,
    token_hits,
)
from metake.evaluation.report import mean_std
from metake.requests import EditRequest


# ----- metrics on hand-built numbers --------------------------------------------------------
def test_token_hits_and_accuracy_on_known_logits():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    targets = torch.tensor([1, 2, 2, 2])
    hits = token_hits(logits, targets)
    assert hits.tolist() == [True, False, True, False]
    assert token_accuracy_of(hits.tolist()) == 0.5
    with pytest.raises(ValueError):
        token_accuracy_of([])


def test_answer_score_nll_is_the_mean_per_token():
    score = AnswerScore(hits=(True, False), log_probs=(math.log(0.5), math.log(0.125)))
    assert score.accuracy == 0.5
    assert score.nll == pytest.approx((math.log(2) + math.log(8)) / 2)


def test_compare_answers_score_and_magnitude():
    won, margin = compare_answers(math.log(2), math.log(4))  # P 0.5 vs 0.25
    assert won == 1.0 and margin == pytest.approx(0.25)
    won, margin = compare_answers(math.log(4), math.log(2))
    assert won == 0.0 and margin == pytest.approx(-0.25)
    assert compare_answers(1.0, 1.0)[0] == 0.0  # a tie is not a win


def test_ngram_entropy_known_values():
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3; trigrams aba, bab -> 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("same same same same same") == 0.0  # one repeated n-gram
    assert ngram_entropy("one") == 0.0
    # punctuation is a token of its own
    assert ngram_entropy("x, y") == ngram_entropy("x , y")


def test_perplexity_of():
    assert perplexity_of(3 * math.log(4), 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity_of(1.0, 0)


def test_mean_std_uses_the_sample_deviation():
    stat = mean_std([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["std"] == pytest.approx(1.0) and stat["n"] == 3
    assert mean_std([5.0])["std"] == 0.0


# ----- scoring a model ----------------------------------------------------------------------
def _manual_scores(model, tok, prompt, answer):
    enc = encode_pair(tok, prompt, answer)
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.target_positions]
    logp = torch.log_softmax(logits.float(), -1)
    ids = torch.tensor(enc.target_ids)
    return (logits.argmax(-1) == ids).tolist(), logp.gather(-1, ids[:, None])[:, 0].tolist()


@torch.no_grad()
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_score_pairs_matches_one_prompt_at_a_time(model_type):
    """Batched, padded, and with the LM head on the target positions only (``logits_to_keep``):
    the same hits and log-probabilities as full logits of one prompt at a time."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    pairs = [("Anna lives in", "Oslo"), ("x?", "a longer answer"), ("The sky is", "blue")]
    scores = score_pairs(model, tok, pairs, batch_size=2)  # padding and sorting involved
    for (prompt, answer), score in zip(pairs, scores, strict=True):
        hits, logp = _manual_scores(model, tok, prompt, answer)
        assert list(score.hits) == hits
        assert list(score.log_probs) == pytest.approx(logp, abs=1e-5)


@torch.no_grad()
def test_text_perplexity_matches_a_direct_computation():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    texts = ["hello there", "a much longer text about rivers"]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert text_perplexity(model, tok, texts) == pytest.approx(math.exp(nll / count), rel=1e-5)


def _record(index, prompt, subject, new, true=None, paraphrases=(), neighbours=()):
    return EvalRecord(index, EditRequest(prompt, subject, new, true), paraphrases, neighbours)


@torch.no_grad()
def test_evaluate_records_zsre_and_counterfact_metrics():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    record = _record(3, "{} lives in", "Anna", "Oslo", "Rome", ("Anna's home is",),
                     (("The sky is", "blue"),))  # fmt: skip
    zsre = evaluate_records(model, tok, [record], "zsre")[0]
    hits, _ = _manual_scores(model, tok, "Anna lives in", "Oslo")
    assert zsre["index"] == 3
    assert zsre["efficacy"] == pytest.approx(sum(hits) / len(hits))
    assert zsre["efficacy_exact"] == float(all(hits))
    hits, _ = _manual_scores(model, tok, "The sky is", "blue")
    assert zsre["specificity"] == pytest.approx(sum(hits) / len(hits))
    hits, _ = _manual_scores(model, tok, "Anna's home is", "Oslo")
    assert zsre["generalization"] == pytest.approx(sum(hits) / len(hits))

    cf = evaluate_records(model, tok, [record], "counterfact")[0]
    _, new = _manual_scores(model, tok, "Anna lives in", "Oslo")
    _, true = _manual_scores(model, tok, "Anna lives in", "Rome")
    nll_new, nll_true = -sum(new) / len(new), -sum(true) / len(true)
    assert cf["efficacy_score"] == float(nll_new < nll_true)
    assert cf["efficacy_magnitude"] == pytest.approx(math.exp(-nll_new) - math.exp(-nll_true),
                                                     abs=1e-6)  # fmt: skip
    _, new = _manual_scores(model, tok, "Anna's home is", "Oslo")
    _, true = _manual_scores(model, tok, "Anna's home is", "Rome")
    nll_new, nll_true = -sum(new) / len(new), -sum(true) / len(true)
    assert cf["paraphrase_score"] == float(nll_new < nll_true)
    assert cf["paraphrase_magnitude"] == pytest.approx(math.exp(-nll_new) - math.exp(-nll_true),
                                                       abs=1e-6)  # fmt: skip
    _, new = _manual_scores(model, tok, "The sky is", "Oslo")
    _, truth = _manual_scores(model, tok, "The sky is", "blue")
    nll_new, nll_truth = -sum(new) / len(new), -sum(truth) / len(truth)
    assert cf["neighborhood_score"] == float(nll_truth < nll_new)
    assert cf["neighborhood_magnitude"] == pytest.approx(
        math.exp(-nll_truth) - math.exp(-nll_new), abs=1e-6
    )
    assert mean_metrics([{"a": 0.5}, {"a": None}, {"a": 1.0}], ["a"]) == {"a": 75.0}


# ----- datasets -----------------------------------------------------------------------------
def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


ZSRE = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
    "answers": ["uniform"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
    "cond": "",
}  # fmt: skip


def test_zsre_loader_builds_the_protocol_prompts_and_skips_bad_records(tmp_path):
    bad = [{**ZSRE, "answers": []}, {**ZSRE, "src": "No subject here?"}, "not an object"]
    path = _write(tmp_path, "z.json", [ZSRE, *bad, {**ZSRE, "subject": "Acme",
                                                     "src": "What does Acme make?"}])  # fmt: skip
    ds = load_dataset("zsre", path)
    assert [r.index for r in ds.records] == [0, 4]
    assert [i for i, _ in ds.skipped] == [1, 2, 3]
    first = ds.records[0]
    assert first.request.prompt == "What is the product made by {}?"
    assert first.request.target_new == "uniform"
    assert first.paraphrases == ("What will be the product of UniFirst?",)
    assert first.neighbours == (("nq question: who wrote hamlet?", "Shakespeare"),)
    assert load_dataset("zsre", path, zsre_target="alt").records[0].request.target_new == (
        "unmanned aircraft"
    )


def test_counterfact_flat_and_memit_styles(tmp_path):
    flat = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is",
            "subject": "Danielle Darrieux", "target_new": "English", "ground_truth": "French",
            "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
            "locality_prompt": "Michel Rocard is a native speaker of",
            "locality_ground_truth": "French"}  # fmt: skip
    memit = {"case_id": 1, "requested_rewrite": {
        "prompt": "{} plays the sport of", "subject": "Michael Jordan",
        "target_new": {"str": "baseball"}, "target_true": {"str": "basketball"}},
        "paraphrase_prompts": ["Jordan's sport: Michael Jordan plays"],
        "neighborhood_prompts": ["Larry Bird plays the sport of"],
        "generation_prompts": ["Michael Jordan is best known for"]}  # fmt: skip
    no_truth = {k: v for k, v in flat.items() if k != "ground_truth"}
    ds = load_dataset("counterfact", _write(tmp_path, "cf.json", [flat, memit, no_truth]))
    assert len(ds.records) == 2 and ds.skipped[0][0] == 2
    a, b = ds.records
    assert a.request.prompt == "The mother tongue of {} is" and a.request.target_true == "French"
    assert a.neighbours == (("Michel Rocard is a native speaker of", "French"),)
    assert b.neighbours == (("Larry Bird plays the sport of", "basketball"),)
    assert b.generation_prompts == ("Michael Jordan is best known for",)


def test_jsonl_with_a_malformed_line_is_counted_not_fatal(tmp_path):
    path = tmp_path / "own.jsonl"
    good = {"prompt": "{} lives in", "subject": "Anna", "target_new": "Oslo",
            "rephrase_prompts": ["Anna's home town is"]}  # fmt: skip
    path.write_text(json.dumps(good) + "\n{broken\n\n" + json.dumps(good) + "\n", encoding="utf-8")
    ds = load_dataset("requests", path)
    assert len(ds.records) == 2 and len(ds.skipped) == 1
    assert "malformed JSON" in ds.skipped[0][1]
    assert ds.records[0].paraphrases == ("Anna's home town is",)


def test_dataset_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("zsre", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DatasetError, match="malformed JSON"):
        load_dataset("zsre", tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="no valid"):
        load_dataset("zsre", _write(tmp_path, "none.json", [{"x": 1}]))
    with pytest.raises(MetakeError, match="unknown dataset"):
        data_path("squad", None)
    monkeypatch.delenv("METAKE_ZSRE_DATA", raising=False)
    with pytest.raises(DatasetError, match="METAKE_ZSRE_DATA"):
        data_path("zsre", None)
    monkeypatch.setenv("METAKE_ZSRE_DATA", str(tmp_path / "z.json"))
    assert data_path("zsre", None) == tmp_path / "z.json"


def test_sampling_is_fixed_by_the_seed():
    records = [_record(i, "{} x", f"s{i}", "y") for i in range(50)]
    first = [r.index for r in sample_records(records, 10, seed=1)]
    assert first == [r.index for r in sample_records(records, 10, seed=1)]
    assert first != [r.index for r in sample_records(records, 10, seed=2)]
    assert len(set(first)) == 10
    with pytest.raises(DatasetError, match="asked for 51"):
        sample_records(records, 51, seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "zsre").is_dir(), reason="../shared/data is not present")
def test_shared_datasets_load_completely():
    assert len(load_dataset("zsre", SHARED_DATA / "zsre" / "zsre_1k.json").records) == 1000
    cf = load_dataset("counterfact", SHARED_DATA / "counterfact" / "counterfact_10k.json")
    assert len(cf.records) == 10000 and not cf.skipped


def _records(count: int):
    from metake.evaluation.datasets import EvalRecord

    return [EvalRecord(i, EditRequest("{} is in", f"S{i}", "X"), (), ()) for i in range(count)]


def test_select_records_ranges_in_file_order_and_exclusions():
    """--records takes file positions in order; --exclude keeps a split out of the sampling."""
    from metake.evaluation.datasets import DatasetError, parse_ranges, select_records

    records = _records(50)
    del records[7]  # an invalid (skipped) record: positions stay file positions
    assert [r.index for r in select_records(records, 5, 0, only="5:9,20:22")] == [5, 6, 8, 20, 21]
    with pytest.raises(DatasetError, match="fewer than"):
        select_records(records, 6, 0, only="5:9,20:22")
    for seed in range(5):
        sampled = select_records(records, 30, seed, exclude="0:10,40:50")
        assert all(10 <= r.index < 40 for r in sampled) and len({r.index for r in sampled}) == 30
    with pytest.raises(DatasetError, match="overlaps"):
        select_records(records, 2, 0, only="0:5", exclude="4:6")
    for bad in ("5", "9:3", "a:b", "-1:4", ""):
        with pytest.raises(DatasetError, match="range"):
            parse_ranges(bad)


@torch.no_grad()
def test_generation_metrics_read_the_greedy_continuations():
    """efficacy_gen / generalization_gen (zsRE) and paraphrase_gen (CounterFact): 1 where the
    greedy text starts with the target, per prompt, paraphrases averaged."""
    from metake.probe import greedy_completion

    model, tok = tiny_model("llama"), tiny_tokenizer()
    own = greedy_completion(model, tok, "Anna lives in", 4).split()[0]  # what the model says
    record = _record(0, "{} lives in", "Anna", own, "Rome",
                     ("Anna lives in", "Anna's home is zz"))  # fmt: skip
    other = greedy_completion(model, tok, "Anna's home is zz", 4).lstrip()
    zsre = evaluate_records(model, tok, [record], "zsre", generation=True)[0]
    assert zsre["efficacy_gen"] == 1.0
    assert zsre["generalization_gen"] == (1.0 + float(other.startswith(own))) / 2
    cf = evaluate_records(model, tok, [record], "counterfact", generation=True)[0]
    assert cf["efficacy_gen"] == 1.0 and cf["paraphrase_gen"] == zsre["generalization_gen"]
    assert "efficacy_gen" not in evaluate_records(model, tok, [record], "zsre")[0]


@torch.no_grad()
def test_specificity_alone_equals_the_full_evaluations():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    records = [
        _record(0, "{} lives in", "Anna", "Oslo", neighbours=[("Bob lives in", "Rome")]),
        _record(1, "{} is a", "Cat", "dog", neighbours=[("x is", "a y"), ("The sky is", "blue")]),
        _record(2, "{} plays", "Tom", "chess"),  # no neighbour question: left out of the mean
    ]
    full = mean_metrics(evaluate_records(model, tok, records, "zsre"), ["specificity"])
    assert specificity(model, tok, records) == pytest.approx(full["specificity"])
    with pytest.raises(ValueError, match="no record has a neighbour"):
        specificity(model, tok, records[2:])
