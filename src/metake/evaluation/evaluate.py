"""Per-record metrics of a model on evaluation records, and model-level figures (drift, fluency).

:func:`evaluate_records` runs every prompt of every record teacher-forced in a few batched
forwards and returns one dict of metrics per record (values in [0, 1]; ``None`` where a record
has no prompt of that kind). Metric names: zsRE (and the user's own requests) ``efficacy``,
``efficacy_exact`` (all answer tokens right), ``generalization``, ``specificity``; CounterFact
``efficacy_score``, ``efficacy_magnitude``, ``paraphrase_score``, ``paraphrase_magnitude``,
``neighborhood_score``, ``neighborhood_magnitude``. With ``generation=True`` also the
generation-based success rates (the greedy continuation starts with the whole target; teacher
forcing flatters editing methods): ``efficacy_gen`` and ``generalization_gen`` (zsRE) or
``paraphrase_gen`` (CounterFact).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from metake.evaluation.datasets import EvalRecord
from metake.evaluation.metrics import (
    AnswerScore,
    compare_answers,
    context_size,
    ngram_entropy,
    score_pairs,
)
from metake.probe import generation_success, greedy_completion

ZSRE_METRICS = ("efficacy", "generalization", "specificity", "efficacy_exact",
                "efficacy_gen", "generalization_gen")  # fmt: skip
COUNTERFACT_METRICS = (
    "efficacy_score", "paraphrase_score", "neighborhood_score",
    "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
    "efficacy_gen", "paraphrase_gen",
)  # fmt: skip
GENERATION_METRICS = {"zsre": ("efficacy_gen", "generalization_gen"),
                      "requests": ("efficacy_gen", "generalization_gen"),
                      "counterfact": ("efficacy_gen", "paraphrase_gen")}  # fmt: skip
"""The generation-based success rates beside the teacher-forced Eff. and Gen./Paraphrase."""
MAIN_METRICS = {"zsre": ZSRE_METRICS[:3], "requests": ZSRE_METRICS[:3],
                "counterfact": COUNTERFACT_METRICS[:3]}  # fmt: skip
"""The three columns of the paper's Table 1 for each dataset kind."""


def metric_names(kind: str) -> tuple[str, ...]:
    """Every per-record metric of dataset ``kind``."""
    return COUNTERFACT_METRICS if kind == "counterfact" else ZSRE_METRICS


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _accuracy_metrics(record: EvalRecord, score) -> dict[str, float | None]:
    edit = score((record.request.filled_prompt, record.request.target_new))
    return {
        "efficacy": edit.accuracy,
        "efficacy_exact": float(all(edit.hits)),
        "generalization": _mean(
            [score((p, record.request.target_new)).accuracy for p in record.paraphrases]
        ),  # fmt: skip
        "specificity": _mean([score(pair).accuracy for pair in record.neighbours]),
    }


def _comparison(score, cases: Sequence[tuple[str, str, str]], new_wins: bool):
    """Mean score and magnitude over ``(prompt, new, true)`` cases of a probability comparison.

    ``new_wins``: the new answer should be the likelier one (Efficacy, Paraphrase); otherwise the
    true one should (Neighbourhood).
    """
    scores, margins = [], []
    for prompt, new, true in cases:
        nll_new, nll_true = score((prompt, new)).nll, score((prompt, true)).nll
        first, second = (nll_new, nll_true) if new_wins else (nll_true, nll_new)
        won, margin = compare_answers(first, second)
        scores.append(won)
        margins.append(margin)
    return _mean(scores), _mean(margins)


def _counterfact_metrics(record: EvalRecord, score) -> dict[str, float | None]:
    request = record.request
    new, true = request.target_new, request.target_true or ""
    es, em = _comparison(score, [(request.filled_prompt, new, true)], True)
    ps, pm = _comparison(score, [(p, new, true) for p in record.paraphrases], True)
    ns, nm = _comparison(score, [(p, new, truth) for p, truth in record.neighbours], False)
    return {
        "efficacy_score": es,
        "efficacy_magnitude": em,
        "paraphrase_score": ps,
        "paraphrase_magnitude": pm,
        "neighborhood_score": ns,
        "neighborhood_magnitude": nm,
    }


def _pairs_of(record: EvalRecord, kind: str) -> list[tuple[str, str]]:
    request = record.request
    if kind != "counterfact":
        return ([(request.filled_prompt, request.target_new)]
                + [(p, request.target_new) for p in record.paraphrases]
                + list(record.neighbours))  # fmt: skip
    answers = [request.target_new, request.target_true or ""]
    prompts = [request.filled_prompt, *record.paraphrases]
    pairs = [(p, a) for p in prompts for a in answers]
    return pairs + [(p, a) for p, truth in record.neighbours for a in (request.target_new, truth)]


def evaluate_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    kind: str,
    batch_size: int = 32,
    generation: bool = False,
) -> list[dict[str, Any]]:
    """One metrics dict per record (see the module docstring), plus its ``index``."""
    pairs = sorted({pair for record in records for pair in _pairs_of(record, kind)})
    scored = dict(zip(pairs, score_pairs(model, tokenizer, pairs, batch_size), strict=True))

    def score(pair: tuple[str, str]) -> AnswerScore:
        return scored[pair]

    out = []
    for record in records:
        metrics = (_counterfact_metrics if kind == "counterfact" else _accuracy_metrics)(
            record, score
        )
        out.append({"index": record.index, **metrics})
    if generation:
        for row, gen in zip(out, _generation_metrics(model, tokenizer, records, kind, batch_size),
                            strict=True):  # fmt: skip
            row.update(gen)
    return out


def specificity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    batch_size: int = 32,
) -> float:
    """zsRE Spe. (percent) alone: the mean over ``records`` with neighbour questions of their
    mean token accuracy, as :func:`evaluate_records` and :func:`mean_metrics` give it, without
    scoring the edit prompts and paraphrases."""
    pairs = sorted({pair for record in records for pair in record.neighbours})
    scored = dict(zip(pairs, score_pairs(model, tokenizer, pairs, batch_size), strict=True))
    per_record = [_mean([scored[pair].accuracy for pair in r.neighbours]) for r in records]
    values = [v for v in per_record if v is not None]
    if not values:
        raise ValueError("specificity: no record has a neighbour question")
    return 100 * statistics.fmean(values)


def _generation_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    kind: str,
    batch_size: int,
) -> list[dict[str, float | None]]:
    """Per record: the edit prompt's and the mean paraphrase's generation success (0/1 each)."""
    pairs = sorted({(p, r.request.target_new) for r in records
                    for p in (r.request.filled_prompt, *r.paraphrases)})  # fmt: skip
    hits = dict(zip(pairs, generation_success(model, tokenizer, pairs, batch_size), strict=True))
    edit_name, paraphrase_name = GENERATION_METRICS[kind]
    return [
        {
            edit_name: float(hits[(r.request.filled_prompt, r.request.target_new)]),
            paraphrase_name: _mean([float(hits[(p, r.request.target_new)]) for p in r.paraphrases]),
        }
        for r in records
    ]


def mean_metrics(per_record: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over the records that have it, in percent."""
    out = {}
    for name in names:
        values = [r[name] for r in per_record if r.get(name) is not None]
        if values:
            out[name] = 100 * statistics.fmean(values)
    return out


def generation_fluency(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    max_new_tokens: int = 40,
) -> dict[str, Any]:
    """Mean n-gram entropy of greedy continuations of each record's generation prompts.

    A record without ``generation_prompts`` uses its filled edit prompt. Greedy decoding keeps
    it deterministic (ROME samples, which gives higher entropies than greedy text).
    """
    texts = []
    limit = context_size(model)
    for record in records:
        for prompt in record.generation_prompts or (record.request.filled_prompt,):
            room = max_new_tokens
            if limit:
                room = min(room, limit - len(tokenizer(prompt)["input_ids"]))
            if room > 0:
                texts.append(prompt + greedy_completion(model, tokenizer, prompt, room))
    fluency = statistics.fmean(ngram_entropy(t) for t in texts) if texts else None
    return {"fluency": fluency, "texts": texts}
