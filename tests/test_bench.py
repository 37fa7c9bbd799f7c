"""``metake bench`` on a tiny model: run folder, aggregates, resume after an interruption."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from test_editor import TEXTS
from tiny_models import tiny_model, tiny_tokenizer

from metake.checkpoint import load_checkpoint
from metake.corpus import TextCorpus
from metake.editor import Editor
from metake.errors import MetakeError
from metake.evaluation.bench import BenchConfig, BenchRun, curve_sample, method_spec, run_bench
from metake.evaluation.report import progress_table, write_progress
from metake.stats import StatsCache

NAMES = ["Anna Berg", "Carl Dunn", "Eva Holm", "Ivan Roth", "Lena Ost", "Omar Said"]
CITIES = ["Oslo", "Lima", "Rome", "Kiev", "Bern", "Doha"]


def _zsre_file(tmp_path):
    records = [
        {"subject": name, "src": f"Where does {name} live?", "rephrase": f"{name} lives where?",
         "answers": [city], "alt": "Paris", "loc": "nq question: colour of the sky",
         "loc_ans": "blue"}
        for name, city in zip(NAMES, CITIES, strict=True)
    ]  # fmt: skip
    path = tmp_path / "tiny_zsre.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _config(tmp_path, **extra):
    settings = dict(
        model="tiny-llama", dataset="zsre", data=str(_zsre_file(tmp_path)),
        methods=["memit", "alphaedit", "metake"], edits=4, batch_size=2, seeds=[0, 1],
        fluency_records=2, drift_texts=3,
        overrides={"layers": [0, 1], "v_steps": 3, "mom2_samples": 20, "mom2_update_weight": 10.0,
                   "context_count": 1, "context_length": 3, "metake_steps": 2,
                   "nullspace_threshold": 0.5, "nullspace_relative": True},
    )  # fmt: skip
    settings.update(extra)
    return BenchConfig(**settings)


def _run(config, out, model, tmp_path, **options):
    return run_bench(config, out, model, tiny_tokenizer(),
                     corpus=TextCorpus.from_texts(TEXTS, name="bench test texts"),
                     stats_cache=StatsCache(tmp_path / "stats"), **options)  # fmt: skip


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bench_writes_results_and_resume_gives_identical_numbers(tmp_path):
    model = tiny_model("llama")
    before = _weights(model)
    config = _config(tmp_path)
    full = _run(config, tmp_path / "full", model, tmp_path)

    # the folder: results, table, plots, log, per-seed parts; no checkpoints left behind
    out = tmp_path / "full"
    for name in ("results.json", "results.md", "final_metrics.png", "metrics_vs_edits.png",
                 "bench.log", "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.state.*"))
    assert set(full["aggregate"]) == {"memit", "alphaedit", "metake"}
    for method, figures in full["aggregate"].items():
        for metric in ("efficacy", "generalization", "specificity", "seconds_per_edit"):
            assert {"mean", "std"} <= set(figures[metric]), (method, metric)
    assert set(full["pre_edit"]) >= {"efficacy", "generalization", "specificity", "perplexity",
                                     "efficacy_gen", "generalization_gen"}  # fmt: skip
    assert full["versions"]["torch"] == torch.__version__
    run0 = full["runs"]["0"]
    assert len(run0["methods"]["memit"]["per_record"]) == 4
    assert [p["edits"] for p in run0["methods"]["memit"]["curve"]] == [2, 4]
    assert run0["records"] != full["runs"]["1"]["records"]  # seeds draw different records
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| memit |" in table and "| unedited |" in table and "±" in table
    assert "Eff. (generation)" in table and "Gen. (generation)" in table
    assert "Timing: " in table and "cores busy" in table  # how busy the machine was
    curves = [full["runs"][s]["methods"]["alphaedit"]["curve"] for s in ("0", "1")]
    mean_eff = statistics.fmean(c[1]["efficacy"] for c in curves)  # after 4 edits, over seeds
    assert "After each batch (the curves, mean over seeds)" in table
    alphaedit_curve = table.split("\nalphaedit:\n\n")[1].split("\n\n")[0]
    assert alphaedit_curve.startswith("| edits | scored | Eff. |")
    assert f"\n| 4 | 4 | {mean_eff:.2f} |" in alphaedit_curve
    batch = run0["methods"]["memit"]["batches"][0]
    assert batch["threads"] == torch.get_num_threads() and batch["cpu"]["seconds"] > 0
    assert all({"efficacy_gen", "perplexity"} <= set(p) for p in run0["methods"]["memit"]["curve"])
    for name, value in _weights(model).items():  # every method restored the model
        assert torch.equal(value, before[name]), name

    # interrupted after one batch of seed 0's first method, then resumed
    part = tmp_path / "part"
    assert _run(config, part, model, tmp_path, stop_after_batches=1) == {}
    assert (part / "parts" / "seed0" / "memit.state.safetensors").is_file()
    progress = progress_table(part)
    assert "pending: memit (checkpointed, 1 of 2 batches), alphaedit (not started)" in progress
    assert "seed 1: not started" in progress
    # the unfinished part's curve so far, read from the checkpoint's header
    first_point = full["runs"]["0"]["methods"]["memit"]["curve"][0]
    assert "memit:\n\n| edits | scored | Eff. |" in progress
    assert f"| 2 | 2 | {first_point['efficacy']:.2f} |" in progress
    assert "| 4 | " not in progress  # the second batch never ran
    # nothing finished: the unfinished curve alone, no final bars
    written = write_progress(part)
    assert [p.name for p in written] == ["progress.md", "progress_metrics_vs_edits.png"]
    assert "pending: memit" in (part / "progress.md").read_text(encoding="utf-8")
    written = write_progress(out)  # every method finished: curves of all of them
    assert [p.name for p in written] == ["progress.md", "progress_metrics_vs_edits.png",
                                         "progress_final_metrics.png"]  # fmt: skip
    assert all(p.is_file() for p in written)
    for name, value in _weights(model).items():  # interruption restored the model too
        assert torch.equal(value, before[name]), name
    resumed = _run(BenchRun.read_config(part), part, model, tmp_path)
    for seed in ("0", "1"):
        for method in config.methods:
            a = full["runs"][seed]["methods"][method]
            b = resumed["runs"][seed]["methods"][method]
            assert a["per_record"] == b["per_record"], (seed, method)
            assert a["curve"] == b["curve"], (seed, method)
            assert a["perplexity"] == b["perplexity"]
    for method, figures in full["aggregate"].items():
        for metric in ("efficacy", "generalization", "specificity"):
            assert figures[metric] == resumed["aggregate"][method][metric]


def _capture_final_edits(monkeypatch) -> list[tuple[dict, dict, bool]]:
    """Patch ``Editor.restore`` to record, before each restore of an edited session, its
    accumulated deltas, its solver state and whether it was finalised: what a run ended on."""
    finals = []
    real_restore = Editor.restore

    def capturing_restore(self):
        if self._originals:
            deltas = {k: v.clone() for k, v in self.accumulated_deltas().items()}
            finals.append((deltas, self.state_dict().get("prev_keys_cov", {}), self.finalized))
        real_restore(self)

    monkeypatch.setattr(Editor, "restore", capturing_restore)
    return finals


def _assert_same_final(a: tuple[dict, dict, bool], b: tuple[dict, dict, bool]) -> None:
    """Bit-identical deltas and key caches, same finalised state."""
    assert a[0].keys() == b[0].keys() and a[0] and a[2] == b[2]
    for name, delta in a[0].items():
        assert torch.equal(delta, b[0][name]), name
    assert a[1].keys() == b[1].keys()
    for layer, cache in a[1].items():
        assert torch.equal(cache, b[1][layer]), layer


def test_resume_checkpoint_restores_the_exact_weights(tmp_path, monkeypatch):
    """An interrupted AlphaEdit run resumed from its checkpoint ends on bit-identical weights
    (and key cache) to an uninterrupted one."""
    finals = _capture_final_edits(monkeypatch)
    model = tiny_model("gpt2")
    config = _config(tmp_path, methods=["alphaedit"], seeds=[0], edits=6, curve=False)
    _run(config, tmp_path / "a", model, tmp_path, stop_after_batches=2)
    state = load_checkpoint(tmp_path / "a" / "parts" / "seed0" / "alphaedit.state.safetensors")
    assert len(state["batches"]) == 2
    assert state["editor"]["prev_keys_cov"]  # AlphaEdit's cache is part of the checkpoint
    finals.clear()
    resumed = _run(config, tmp_path / "a", model, tmp_path)
    resumed_final = finals[-1]
    finals.clear()
    fresh = _run(config, tmp_path / "b", model, tmp_path)
    _assert_same_final(resumed_final, finals[-1])
    assert resumed_final[1]  # the key cache took part
    assert (resumed["runs"]["0"]["methods"]["alphaedit"]["per_record"]
            == fresh["runs"]["0"]["methods"]["alphaedit"]["per_record"])  # fmt: skip


def test_bench_config_errors(tmp_path):
    with pytest.raises(MetakeError, match="unknown method"):
        _config(tmp_path, methods=["memit", "magic"])
    with pytest.raises(MetakeError, match="only metake"):
        _config(tmp_path, methods=["memit+alphaedit"])
    with pytest.raises(MetakeError, match="listed twice"):
        _config(tmp_path, methods=["memit", "memit"])
    assert method_spec("metake+memit", "alphaedit") == ("metake", "memit")
    assert method_spec("metake", "rome") == ("metake", "rome")
    model = tiny_model("llama")
    _run(_config(tmp_path, methods=["memit"], seeds=[0], edits=2), tmp_path / "c", model,
         tmp_path)  # fmt: skip
    with pytest.raises(MetakeError, match="another configuration"):
        _run(_config(tmp_path, methods=["memit"], seeds=[0], edits=4), tmp_path / "c", model,
             tmp_path)  # fmt: skip
    with pytest.raises(MetakeError, match="not a bench run folder"):
        BenchRun.read_config(tmp_path / "nowhere")


def test_a_finished_run_takes_more_methods_and_keeps_its_parts(tmp_path, monkeypatch):
    """Methods listed after the saved ones are added to a run (same records, the finished
    parts not edited again); any other change of the list is refused."""
    model = tiny_model("llama")
    first = _run(_config(tmp_path, methods=["memit"], seeds=[0], edits=2), tmp_path / "c", model,
                 tmp_path)  # fmt: skip
    real_edit = Editor.edit
    edited: list[str] = []

    def counting_edit(self, *args, **kwargs):
        edited.append(self.method)
        return real_edit(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "edit", counting_edit)
    grown = _run(_config(tmp_path, methods=["memit", "alphaedit"], seeds=[0], edits=2),
                 tmp_path / "c", model, tmp_path)  # fmt: skip
    assert edited and set(edited) == {"alphaedit"}  # memit's part was kept, not edited again
    assert grown["runs"]["0"]["records"] == first["runs"]["0"]["records"]
    assert (grown["runs"]["0"]["methods"]["memit"]["per_record"]
            == first["runs"]["0"]["methods"]["memit"]["per_record"])  # fmt: skip
    assert BenchRun.read_config(tmp_path / "c").methods == ["memit", "alphaedit"]
    for methods in (["alphaedit", "memit", "rome"], ["memit"], ["rome", "memit", "alphaedit"]):
        with pytest.raises(MetakeError, match="another configuration"):
            _run(_config(tmp_path, methods=methods, seeds=[0], edits=2), tmp_path / "c", model,
                 tmp_path)  # fmt: skip


def test_bench_runs_the_table1_baselines_and_resumes_prune(tmp_path, monkeypatch):
    """RECT, PRUNE, BLUE and ROME by name; PRUNE interrupted while finalised resumes exactly."""
    model = tiny_model("llama")
    before = _weights(model)
    overrides = {"layers": [0, 1, 2], "rect_keep_fraction": 0.3}
    config = _config(tmp_path, methods=["rome", "prune", "rect", "alphaedit_blue",
                                        "metake+alphaedit_blue"], seeds=[0],
                     overrides={**_config(tmp_path).overrides, **overrides})  # fmt: skip
    full = _run(config, tmp_path / "full", model, tmp_path)
    assert set(full["aggregate"]) == set(config.methods)
    methods = full["runs"]["0"]["methods"]
    assert methods["prune"]["solver"] == "memit_prune"
    assert methods["metake+alphaedit_blue"]["solver"] == "alphaedit_blue"
    assert methods["alphaedit_blue"]["hparams"]["layers"] == [0, 2]
    assert methods["rome"]["hparams"]["layers"] == [2]
    for name, value in _weights(model).items():
        assert torch.equal(value, before[name]), name

    part = tmp_path / "part"
    prune_only = _config(tmp_path, methods=["prune"], seeds=[0],
                         overrides={**_config(tmp_path).overrides, **overrides})  # fmt: skip
    _run(prune_only, part, model, tmp_path, stop_after_batches=1)
    state = load_checkpoint(part / "parts" / "seed0" / "prune.state.safetensors")
    assert state["editor"]["finalized"]
    finals = _capture_final_edits(monkeypatch)
    resumed = _run(prune_only, part, model, tmp_path)
    resumed_final = finals[-1]
    finals.clear()
    _run(prune_only, tmp_path / "prune-fresh", model, tmp_path)
    _assert_same_final(resumed_final, finals[-1])  # bit-identical restrained edit
    assert resumed_final[2]  # ended finalised (PRUNE's restraint applied)
    assert (resumed["runs"]["0"]["methods"]["prune"]["per_record"]
            == methods["prune"]["per_record"])  # fmt: skip


def test_curve_points_score_a_bounded_fixed_sample(tmp_path):
    """After each batch at most curve_records edited records are scored (the run stays linear);
    the final scores cover every record."""
    records = list(range(10))
    assert curve_sample(records, 3, 5, 0) == [0, 1, 2]  # all while few
    later = curve_sample(records, 10, 5, 0)
    assert len(later) == 5 and set(later) <= set(records)
    assert curve_sample(records, 10, 5, 0) == later  # fixed for a seed
    assert set(curve_sample(records, 8, 5, 0)) <= set(range(8))  # only edited ones
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"], seeds=[0], edits=6, curve_records=3)
    result = _run(config, tmp_path / "run", model, tmp_path)
    part = result["runs"]["0"]["methods"]["memit"]
    assert [(p["edits"], p["scored"]) for p in part["curve"]] == [(2, 2), (4, 3), (6, 3)]
    assert len(part["per_record"]) == 6


def test_parts_run_by_separate_processes_merge_into_the_same_report(tmp_path):
    """Each (seed, method) part run on its own (--only), in any order, gives the report of one
    whole run; a part another process holds is skipped, not run twice."""
    from filelock import FileLock

    from metake.evaluation.bench import PartFilter

    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit", "alphaedit"], seeds=[0, 1])
    whole = _run(config, tmp_path / "whole", model, tmp_path)

    shared = tmp_path / "shared"
    pending = _run(config, shared, model, tmp_path, only=PartFilter.parse("method=alphaedit"))
    assert pending == {"pending": ["seed=0,method=memit", "seed=1,method=memit"]}
    assert not (shared / "results.json").exists()
    held = FileLock(str(shared / "parts" / "seed1" / "memit.lock"))
    held.acquire()  # another process is running seed 1's memit
    try:
        pending = _run(config, shared, model, tmp_path)  # takes what nobody holds
        assert "pending: memit (running)" in progress_table(shared)
    finally:
        held.release()
    assert "pending: memit (not started)" in progress_table(shared)
    assert pending == {"pending": ["seed=1,method=memit"]}
    merged = _run(config, shared, model, tmp_path, only=PartFilter.parse("part=2"))  # the last
    for seed in ("0", "1"):
        for method in config.methods:
            a, b = whole["runs"][seed]["methods"][method], merged["runs"][seed]["methods"][method]
            assert a["per_record"] == b["per_record"], (seed, method)
            assert a["curve"] == b["curve"], (seed, method)
    assert merged["aggregate"]["memit"]["efficacy"] == whole["aggregate"]["memit"]["efficacy"]
    assert (shared / "results.md").is_file()


def test_part_filter_errors():
    from metake.evaluation.bench import PartFilter

    parts = [(0, "memit"), (0, "alphaedit"), (1, "memit"), (1, "alphaedit")]
    assert PartFilter.parse("seed=1, method=memit").selects(2, 1, "memit")
    assert not PartFilter.parse("part=3").selects(2, 1, "memit")
    for bad, message in [("seed=x", "whole number"), ("colour=red", "seed=S"), ("", "at least"),
                         ("method", "seed=S")]:  # fmt: skip
        with pytest.raises(MetakeError, match=message):
            PartFilter.parse(bad)
    for bad, message in [("seed=2", "seeds"), ("method=rome", "methods"), ("part=4", "0..3")]:
        with pytest.raises(MetakeError, match=message):
            PartFilter.parse(bad).check(parts)


def _counterfact_file(tmp_path):
    records = [
        {"case_id": i, "prompt": "{} was born in", "subject": name, "target_new": "Oslo",
         "ground_truth": city, "rephrase_prompt": f"{name} is from"}
        for i, (name, city) in enumerate(zip(NAMES, CITIES, strict=True))
    ]  # fmt: skip
    path = tmp_path / "tiny_cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_known_facts_probe_is_scored_before_and_after_the_edits(tmp_path, monkeypatch):
    """The probe's facts are fixed on the unedited model (``probe.json``); the share still
    answered is reported for the unedited model, after the last batch and on the curve."""
    import metake.probe as probe
    from metake.probe import token_accuracy

    facts_file = _counterfact_file(tmp_path)
    monkeypatch.setattr(  # a random model knows no fact: every fact counted as known
        probe, "answer_margins", lambda model, tok, facts, batch_size=16: [10.0] * len(facts)
    )
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"], seeds=[0], probe_data=str(facts_file),
                     probe_records="1:5", probe_facts=3)  # fmt: skip
    result = _run(config, tmp_path / "run", model, tmp_path)
    stored = json.loads((tmp_path / "run" / "probe.json").read_text(encoding="utf-8"))
    assert stored["spec"] == {"data": str(facts_file), "records": "1:5", "limit": 3, "margin": 1.0}
    facts = stored["facts"]
    assert [f["subject"] for f in facts] == NAMES[1:4]
    from metake.requests import EditRequest

    unedited = token_accuracy(tiny_model("llama"), tiny_tokenizer(),
                              [EditRequest(**f) for f in facts])  # fmt: skip
    expected = 100 * sum(a == 1.0 for a in unedited) / len(unedited)
    assert result["runs"]["0"]["pre_edit"]["known_facts_kept"] == pytest.approx(expected)
    part = result["runs"]["0"]["methods"]["memit"]
    assert 0 <= part["known_facts_kept"] <= 100
    assert all("known_facts_kept" in point for point in part["curve"])
    assert "Known facts kept" in (tmp_path / "run" / "results.md").read_text(encoding="utf-8")


def test_probe_facts_must_never_be_edited(tmp_path):
    facts_file = _counterfact_file(tmp_path)
    with pytest.raises(MetakeError, match="no such file"):
        _config(tmp_path, probe_data=str(tmp_path / "missing.json"))
    zsre = _config(tmp_path).data
    with pytest.raises(MetakeError, match="inside --exclude"):
        _config(tmp_path, probe_data=zsre, probe_records="0:2")
    with pytest.raises(MetakeError, match="overlaps --records"):
        _config(tmp_path, probe_data=zsre, probe_records="0:2", records="1:5")
    _config(tmp_path, probe_data=zsre, probe_records="0:2", exclude="0:3")  # fine
    _config(tmp_path, probe_data=str(facts_file), probe_records="0:6")  # another file: fine


def test_resume_refuses_parts_edited_with_another_preset(tmp_path, monkeypatch):
    """A preset adopted between a run's parts must not end up in one table with the old one:
    finished parts and checkpoints record their hyper-parameters, and a resume compares them."""
    import metake.editor as editor_module

    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"], seeds=[0])
    done, halfway = tmp_path / "done", tmp_path / "halfway"
    _run(config, done, model, tmp_path)
    assert _run(config, halfway, model, tmp_path, stop_after_batches=1) == {}
    real = editor_module.memit_hparams

    def retuned(*args, **kwargs):  # as if the built-in preset now had another lambda
        return real(*args, **kwargs).with_overrides(mom2_update_weight=20.0)

    monkeypatch.setattr(editor_module, "memit_hparams", retuned)
    with pytest.raises(MetakeError, match=r"seed 0 memit was edited with other hyper-parameters "
                       r"\(mom2_update_weight 10.0 \(now 20.0\)\)"):  # fmt: skip
        _run(BenchRun.read_config(done), done, model, tmp_path)
    with pytest.raises(MetakeError, match="checkpoint was made with other hyper-parameters"):
        _run(BenchRun.read_config(halfway), halfway, model, tmp_path)


def test_a_part_resumed_after_an_upgrade_records_both_versions(tmp_path, monkeypatch, caplog):
    import metake.evaluation.bench as bench

    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"], seeds=[0])
    out = tmp_path / "run"
    assert _run(config, out, model, tmp_path, stop_after_batches=1) == {}
    first = bench.package_versions()
    state = load_checkpoint(out / "parts" / "seed0" / "memit.state.safetensors")
    assert state["versions"] == [first]  # the checkpoint knows what its batches ran with
    upgraded = {**first, "transformers": "99.0.0"}
    monkeypatch.setattr(bench, "package_versions", lambda: upgraded)
    with caplog.at_level("WARNING", logger="metake.evaluation.bench"):
        result = _run(BenchRun.read_config(out), out, model, tmp_path)
    assert result["runs"]["0"]["methods"]["memit"]["versions"] == [first, upgraded]
    assert "resumed with transformers 99.0.0; its earlier batches ran with transformers" in (
        caplog.text
    )
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "transformers 99.0.0, Python" in table  # what wrote the report
    both = ", ".join(f"{v} (1)" for v in sorted([first["transformers"], "99.0.0"]))
    assert (
        f"its 1 part ran with transformers {both} (number of parts; a part resumed across "
        "versions counts under each)." in table
    )


def test_a_run_on_one_set_of_versions_says_them_once(tmp_path):
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"], seeds=[0])
    result = _run(config, tmp_path / "run", model, tmp_path)
    assert result["runs"]["0"]["methods"]["memit"]["versions"] == [result["versions"]]
    table = (tmp_path / "run" / "results.md").read_text(encoding="utf-8")
    assert "parts ran with" not in table


def test_parts_of_older_code_say_their_versions_were_not_recorded():
    from metake.evaluation.report import _versions_of_parts

    writer = {"metake": "0.1.0", "torch": "2.13.0", "transformers": "5.25.0", "python": "3.11.7",
              "machine": "x86_64"}  # fmt: skip
    parts = {"a": {}, "b": {"versions": [writer]}}
    results = {"versions": writer, "runs": {"0": {"methods": parts}}}
    text = _versions_of_parts(results)
    assert text == (
        " That is what wrote this report; 1 of its 2 parts ran, in full or in part, "
        "on code that did not record the versions."
    )
