"""Corpora from Hugging Face ``datasets``: a ``save_to_disk`` folder, parquet, a text column."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from metake.corpus import TextCorpus, load_corpus
from metake.errors import CorpusError
from metake.stats import compute_second_moments

datasets = pytest.importorskip("datasets")

TEXTS = [f"Article {i} tells of the river and the town number {i}." for i in range(9)]


def _dataset(texts=TEXTS):
    return datasets.Dataset.from_dict(
        {"id": list(range(len(texts))), "body": list(texts), "text": [t.upper() for t in texts]}
    )


def test_saved_dataset_reads_the_column_in_order(tmp_path):
    folder = tmp_path / "saved"
    _dataset().save_to_disk(str(folder))
    corpus = load_corpus(f"{folder}#body")
    assert list(corpus.iter_texts()) == TEXTS and corpus.num_texts == len(TEXTS)
    assert list(corpus.iter_texts()) == TEXTS  # every pass the same
    default = load_corpus(folder)  # the "text" column unless told otherwise
    assert list(default.iter_texts()) == [t.upper() for t in TEXTS]
    assert default.fingerprint != corpus.fingerprint  # the column is part of the identity
    assert load_corpus(f"{folder}#body").fingerprint == corpus.fingerprint  # stable

    other = tmp_path / "other"
    _dataset(TEXTS[:-1] + ["A different last article."]).save_to_disk(str(other))
    assert load_corpus(f"{other}#body").fingerprint != corpus.fingerprint  # content counts


def test_parquet_file_and_folder(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    _dataset(TEXTS[:5]).to_parquet(str(folder / "a.parquet"))
    _dataset(TEXTS[5:]).to_parquet(str(folder / "b.parquet"))
    assert list(load_corpus(f"{folder}#body").iter_texts()) == TEXTS
    assert list(load_corpus(f"{folder / 'a.parquet'}#body").iter_texts()) == TEXTS[:5]


def test_statistics_from_a_dataset_equal_those_of_the_same_texts(tmp_path):
    folder = tmp_path / "saved"
    _dataset().save_to_disk(str(folder))
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(with_pad=False)
    options = dict(num_samples=20, max_length=24, batch_size=4, progress=False)
    from_dataset = compute_second_moments(model, tokenizer, [1], load_corpus(f"{folder}#body"),
                                          **options)  # fmt: skip
    in_memory = compute_second_moments(model, tokenizer, [1], TextCorpus.from_texts(TEXTS),
                                       **options)  # fmt: skip
    assert from_dataset[1].num_tokens == in_memory[1].num_tokens
    assert from_dataset[1].mom2.equal(in_memory[1].mom2)


def test_dataset_corpus_errors(tmp_path):
    folder = tmp_path / "saved"
    _dataset().save_to_disk(str(folder))
    with pytest.raises(CorpusError, match=r"no column 'content'.*'body'"):
        load_corpus(f"{folder}#content")
    with pytest.raises(CorpusError, match="int"):
        load_corpus(f"{folder}#id")
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"text": ["", "  "]}).save_to_disk(str(empty))
    with pytest.raises(CorpusError, match="no non-empty texts"):
        load_corpus(empty)
    notes = tmp_path / "notes.txt"
    notes.write_text("one\n\ntwo\n")
    with pytest.raises(CorpusError, match="applies to datasets"):
        load_corpus(f"{notes}#text")
    odd = tmp_path / "odd#name.txt"  # a '#' in a file's own name is not a column
    odd.write_text("one\n\ntwo\n")
    assert list(load_corpus(odd).iter_texts()) == ["one", "two"]
    with pytest.raises(CorpusError, match="hub dataset"):
        load_corpus(f"hf:{tmp_path}/no-such-dataset-here")


def test_hub_dataset_is_streamed_with_its_column(monkeypatch):
    """``hf:NAME:CONFIG@SPLIT#COLUMN``: the hub call (replaced here: no network in tests) gets
    the name, configuration, split and streaming; the texts come from the column, lazily."""
    asked = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        asked.append((name, config, split, streaming))
        rows = [{"body": t, "id": i} for i, t in enumerate(TEXTS)]
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("hf:someone/wiki:20231101.en@validation#body")
    assert asked == [("someone/wiki", "20231101.en", "validation", True)]
    assert corpus.num_texts == 0  # unknown for a stream
    assert list(corpus.iter_texts()) == TEXTS
    plain = load_corpus("hf:someone/wiki#body")
    assert asked[-1] == ("someone/wiki", None, "train", True)
    assert plain.fingerprint != corpus.fingerprint


def test_drift_texts_need_a_corpus_with_an_end(monkeypatch):
    """The bench's held-out drift texts are the corpus's last ones: a stream has no known end."""
    from metake.errors import MetakeError
    from metake.evaluation.bench import held_out_texts

    assert held_out_texts(TextCorpus.from_texts(TEXTS), 2) == TEXTS[-2:]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.IterableDataset.from_generator(
                            lambda: iter([{"text": t} for t in TEXTS])))  # fmt: skip
    stream = load_corpus("hf:someone/wiki")
    with pytest.raises(MetakeError, match="drift-texts 0"):
        held_out_texts(stream, 2)
    assert held_out_texts(stream, 0) == []
