"""``metake tune`` on a tiny model: the search end to end, its preset, resume, the rule, errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import script_module
from filelock import FileLock
from safetensors.torch import load_file
from test_bench import _zsre_file
from test_editor import TEXTS
from tiny_models import tiny_model, tiny_tokenizer

import metake.probe as probe
import metake.tune as tune
from metake.corpus import TextCorpus
from metake.editor import Editor
from metake.errors import MetakeError
from metake.hparams import memit_hparams
from metake.requests import EditRequest
from metake.stats import StatsCache
from metake.tune import TuneConfig, Tuner, run_tune, selection_key, violations
from metake.tune_report import cost_table

FAST = {
    "v_steps": 2,
    "mom2_samples": 20,
    "context_count": 1,
    "context_length": 3,
    "metake_steps": 1,
    "nullspace_relative": True,
}
NAMES = ["Anna Berg", "Carl Dunn", "Eva Holm", "Ivan Roth", "Lena Ost", "Omar Said"]


def _probe_file(tmp_path):
    records = [
        {
            "case_id": i,
            "prompt": "{} was born in",
            "subject": name,
            "target_new": "Oslo",
            "ground_truth": "Lima",
            "rephrase_prompt": f"{name} is from",
        }
        for i, name in enumerate(NAMES)
    ]
    path = tmp_path / "tiny_cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _config(tmp_path, **extra):
    settings = dict(
        model="tiny-llama",
        data=str(_zsre_file(tmp_path)),
        dev_records="0:4",
        probe_data=str(_probe_file(tmp_path)),
        probe_records="0:6",
        methods=["memit", "alphaedit", "rome", "metake"],
        batch_sizes=[2, 4],
        search_records=2,
        window_size=2,
        max_probe_facts=4,
        trace_facts=2,
        drift_texts=2,
        overrides=dict(FAST),
        min_known_facts=1,
    )
    settings.update(extra)
    return TuneConfig(**settings)


@pytest.fixture
def cheap_grids(monkeypatch):
    """Small grids, and every probe fact counted as known (a random model knows none)."""
    monkeypatch.setattr(tune, "LR_GRID", (0.5, 1.0))
    monkeypatch.setattr(
        tune,
        "STRENGTH_GRIDS",
        {
            "memit": {"mom2_update_weight": [1.0, 100.0]},
            "alphaedit": {"nullspace_threshold": [0.3, 0.9], "alphaedit_lambda": [1.0, 10.0]},
            "metake": {"metake_lr": [0.01, 0.1], "metake_reg_weight": [1e-3]},
        },
    )
    monkeypatch.setattr(probe, "answer_margins", _every_fact_known)


def _every_fact_known(model, tok, facts, batch_size=16):
    """Margins of a model that knows every fact well (building and re-checking a probe)."""
    return [10.0] * len(facts)


def _tune(tmp_path, model, config, out="run"):
    return run_tune(
        config,
        tmp_path / out,
        model,
        tiny_tokenizer(),
        corpus=TextCorpus.from_texts(TEXTS, name="tune test texts"),
        stats_cache=StatsCache(tmp_path / "stats"),
    )


def test_tune_end_to_end_writes_a_preset_that_edit_accepts(tmp_path, cheap_grids):
    """Trace, Stage I, windows, strengths, rule; the preset reproduces the chosen settings."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    began = time.perf_counter()
    report = _tune(tmp_path, model, _config(tmp_path))
    elapsed = time.perf_counter() - began
    out = tmp_path / "run"
    for name in (
        "preset.json",
        "report.json",
        "report.md",
        "search.png",
        "rows.jsonl",
        "trace.json",
        "baseline.json",
        "config.json",
    ):
        assert (out / name).is_file(), name
    for k, v in model.state_dict().items():  # every candidate was undone
        assert (v == before[k]).all(), k
    assert set(report["chosen"]) == {"memit", "alphaedit", "rome", "metake"}
    # every window's dev-split targets were computed once and timed; the report says the cost
    lines = (out / "rows.jsonl").read_text().splitlines()
    targets = [r for r in map(json.loads, lines) if r["phase"] == "targets"]
    assert {r["layer"] for r in targets} == {w[-1] for w in report["windows"]}
    assert all(0 < r["seconds"] <= elapsed for r in targets)  # a span within the run
    assert "## Cost" in (out / "report.md").read_text()
    assert len(report["trace"]["mean_ie"]) == 3
    # memit tried every window, then both strengths, at the smallest batch size; its two best
    # (by the rule at that size) were scored at both sizes and the choice is one of them
    memit = report["searched"]["memit"]
    assert {tuple(c["settings"]["layers"]) for c in memit} == {tuple(w) for w in report["windows"]}
    assert {c["settings"]["mom2_update_weight"] for c in memit} >= {1.0, 100.0}
    searched = [c for c in memit if not c["complete"]]
    assert searched and all(list(c["per_batch_size"]) == [2] for c in searched)
    final = [c for c in memit if c["complete"]]
    assert len(final) == 2 and all(sorted(c["per_batch_size"]) == [2, 4] for c in final)
    base = report["baseline"]
    ranked = sorted(searched, key=lambda c: selection_key(c, base), reverse=True)
    top = []
    for c in ranked:
        if c["settings"] not in top:
            top.append(c["settings"])
    assert [c["settings"] for c in final] == top[:2]
    assert report["chosen"]["memit"] in final
    assert "searched at batch size 2 only" in (out / "report.md").read_text(encoding="utf-8")
    # the chosen one is the best under the rule among the complete candidates (written out here)
    for method, rows in report["searched"].items():
        rows = [r for r in rows if r["complete"]]
        passing = [
            r for r in rows
            if r["efficacy"] >= base["efficacy"] + 10.0
            and r["specificity"] >= base["specificity"] - 1.0
            and r["perplexity"] <= 1.02 * base["perplexity"]
            and r["probe_kept"] >= 0.95
        ]  # fmt: skip
        if passing:
            best = max(r["efficacy"] + r["generalization"] for r in passing)
            chosen = report["chosen"][method]
            assert chosen in passing, method
            assert chosen["efficacy"] + chosen["generalization"] == best, method
        else:  # none passes: an editing setting first, then fewest broken conditions
            chosen = report["chosen"][method]
            assert chosen["violations"], method
            editing = [r for r in rows if r["efficacy"] >= base["efficacy"] + 10.0]
            if editing:
                assert chosen in editing, method
                fewest = min(len(r["violations"]) for r in editing)
                assert len(chosen["violations"]) == fewest, method
    # the preset file gives each method its chosen settings through Editor/--preset
    preset = str(out / "preset.json")
    for method, solver in (("memit", None), ("alphaedit", None), ("metake", "alphaedit")):
        editor = Editor(model, tiny_tokenizer(), method, solver=solver, preset=preset)
        chosen = report["chosen"][method]["settings"]
        got = editor.hparams.to_dict()
        for key, value in chosen.items():
            assert got[key] == value, (method, key)
    rome = Editor(model, tiny_tokenizer(), "rome", preset=preset)
    assert list(rome.hparams.layers) == report["chosen"]["rome"]["settings"]["layers"][-1:]
    assert "exclude" in (out / "report.md").read_text(encoding="utf-8")


def test_tune_resumes_without_recomputing(tmp_path, cheap_grids, monkeypatch):
    """A second run over the same folder reuses every row and gives the same choice."""
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"])
    first = _tune(tmp_path, model, config)

    def no_edits(*args, **kwargs):
        raise AssertionError("a finished candidate was evaluated again")

    assert list((tmp_path / "run" / "targets").glob("*.safetensors"))  # Stage I, kept on disk
    rows_file = tmp_path / "run" / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    for number, row in enumerate(rows):  # ids as another version wrote them: found by content
        if row["phase"] == "search":
            row["id"] = f"written by an older version {number}"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(Tuner, "score", no_edits)
    monkeypatch.setattr(tune, "compute_targets", no_edits)
    second = _tune(tmp_path, model, config)
    assert second["chosen"] == first["chosen"]
    # both invocations' wall clocks are kept, and the report states their sum
    runs = json.loads((tmp_path / "run" / tune.INVOCATIONS_FILE).read_text())
    assert len(runs) == 2 and all(r["completed"] and r["seconds"] >= 0 for r in runs)
    assert first["invocations"][0]["seconds"] == runs[0]["seconds"]
    total = sum(r["seconds"] for r in runs) / 60
    assert "Wall clock of the 2 invocation(s) on this folder" in (
        tmp_path / "run" / "report.md"
    ).read_text(encoding="utf-8")
    assert f"**{total:.1f} min**" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_real_edit_candidates_share_one_cached_stage_one(tmp_path, cheap_grids, monkeypatch):
    """MetaKE's candidates (one batch of the search records) take Stage I's plan from the
    tuner's cache instead of each computing it again: the editor's own Stage I never runs."""
    import metake.editor as editor_module

    def no_stage1(*args, **kwargs):
        raise AssertionError("a candidate ran Stage I again")

    monkeypatch.setattr(editor_module, "compute_targets", no_stage1)
    model = tiny_model("llama")
    report = _tune(tmp_path, model, _config(tmp_path, methods=["alphaedit", "metake"]))
    assert len(report["searched"]["metake"]) >= 2
    stored = load_file(str(next((tmp_path / "run" / "targets").glob("*.safetensors"))))
    assert stored["v_init"].shape == stored["targets"].shape  # starting values kept too


def test_search_records_take_the_dev_splits_targets_when_cached(tmp_path, monkeypatch):
    """Targets are computed chunk by chunk, so the search records' (the dev split's leading
    chunk) are sliced from the whole split's when those exist, and a chunk already computed (Stage
    I's lr search) is not computed again for the whole split: bit for bit what computing gives."""

    def tuner(out):
        made = Tuner(_config(tmp_path), tmp_path / out, tiny_model("llama"), tiny_tokenizer(),
                     corpus=TextCorpus.from_texts(TEXTS, name="t"),
                     stats_cache=StatsCache(tmp_path / "stats"))  # fmt: skip
        made.out.mkdir()
        return made

    fresh = tuner("fresh")
    search = fresh.dev[:2]  # _config: batch sizes 2 and 4, a dev split of 4
    computed = fresh.stage1_plan(fresh.base_hparams, search)
    calls = []
    real = tune.compute_targets
    monkeypatch.setattr(tune, "compute_targets", lambda *a, **k: calls.append(a) or real(*a, **k))
    assembled = fresh.stage1_targets(fresh.base_hparams, fresh.dev)  # its first chunk: cached
    assert len(calls) == 1 and [r.request for r in fresh.dev[2:]] == calls[0][2]
    reuse = tuner("reuse")
    whole = reuse.stage1_targets(reuse.base_hparams, reuse.dev)

    def stage1_ran(*args, **kwargs):
        raise RuntimeError("Stage I ran")

    monkeypatch.setattr(tune, "compute_targets", stage1_ran)
    sliced = reuse.stage1_plan(reuse.base_hparams, search)
    assert torch.equal(sliced.v_target, computed.v_target)
    assert torch.equal(sliced.v_target, whole[:2])
    assert torch.equal(assembled, whole)
    assert torch.equal(sliced.v_init, computed.v_init)
    assert sliced.final_nll == computed.final_nll
    odd = reuse.dev[1:3]  # not a leading chunk: computed, not sliced
    with pytest.raises(RuntimeError, match="Stage I ran"):
        reuse.stage1_targets(reuse.base_hparams, odd)


def test_tune_refuses_to_continue_from_another_starting_preset(tmp_path, cheap_grids):
    """The settings a search starts from are kept (start.json): continuing after the preset
    changed (here: another --set) is refused instead of mixing two searches."""
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"])
    _tune(tmp_path, model, config)
    assert json.loads((tmp_path / "run" / "start.json").read_text())["v_steps"] == FAST["v_steps"]
    tuner = Tuner(config, tmp_path / "run", model, tiny_tokenizer(),
                  corpus=TextCorpus.from_texts(TEXTS, name="t"),
                  stats_cache=StatsCache(tmp_path / "stats"))  # fmt: skip
    tuner.base_hparams = tuner.base_hparams.with_overrides(kl_factor=0.5)  # the preset moved
    with pytest.raises(MetakeError, match=r"started its search from other settings \(kl_factor"):
        tuner.run()
    (tmp_path / "run" / "start.json").unlink()  # a folder of an older version: not checked, and
    tuner.run()  # no starting point is made up for it
    assert not (tmp_path / "run" / "start.json").exists()


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    """While one tuner holds the folder's lock, another is refused before it writes anything
    (two would append rows side by side and overwrite each other's report and preset)."""
    config = _config(tmp_path, methods=["memit"])
    out = tmp_path / "run"
    out.mkdir()
    holder = FileLock(str(out / tune.LOCK_NAME))
    holder.acquire()
    try:
        tuner = Tuner(config, out, tiny_model("llama"), tiny_tokenizer(),
                      corpus=TextCorpus.from_texts(TEXTS, name="t"),
                      stats_cache=StatsCache(tmp_path / "stats"))  # fmt: skip
        with pytest.raises(MetakeError, match="another `metake tune` process is running"):
            tuner.run()
    finally:
        holder.release()
    assert sorted(p.name for p in out.iterdir()) == [tune.LOCK_NAME]


def test_metake_grid_follows_the_targets_scale(tmp_path, cheap_grids, monkeypatch):
    """MetaKE's lr grid scales with the targets' size, its regulariser with the inverse
    square (the fixture's grid: lr 0.01, 0.1; regulariser 1e-3)."""
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["alphaedit", "metake"])
    tuner = Tuner(config, tmp_path / "run", model, tiny_tokenizer(),
                  corpus=TextCorpus.from_texts(TEXTS, name="t"),
                  stats_cache=StatsCache(tmp_path / "stats"))  # fmt: skip
    tuner._prepare()
    hp = tuner.base_hparams
    targets = tuner.stage1_targets(hp, tuner.dev[: config.search_records])
    rms = targets.double().pow(2).mean(-1).sqrt()
    assert tuner.target_scale(hp) == pytest.approx(float(rms.median()))
    monkeypatch.setattr(Tuner, "target_scale", lambda self, hp: 10 * tune.REFERENCE_SCALE)
    report = _tune(tmp_path, model, config)
    tried = report["searched"]["metake"]
    lrs = {c["settings"]["metake_lr"] for c in tried}
    assert {0.1, 1.0} <= lrs  # the scaled grid, and steps of it past its edge
    assert lrs - {0.1, 1.0} <= {0.01, 0.001, 10.0, 100.0}
    assert {c["settings"]["metake_reg_weight"] for c in tried} == {1e-5}
    assert tune.STRENGTH_GRIDS["metake"]["metake_lr"] == [0.01, 0.1]  # the table itself kept
    assert report["grid_scales"]["metake"]["factor"] == pytest.approx(10.0)
    assert "metake's grid, scaled to the targets" in (tmp_path / "run" / "report.md").read_text()


def test_no_finalists_scores_every_candidate_at_every_batch_size(tmp_path, cheap_grids):
    model = tiny_model("llama")
    report = _tune(tmp_path, model, _config(tmp_path, methods=["memit"], finalists=0))
    memit = report["searched"]["memit"]
    assert all(c["complete"] and sorted(c["per_batch_size"]) == [2, 4] for c in memit)


def test_tune_refuses_a_stored_probe_built_another_way(tmp_path, cheap_grids, monkeypatch):
    """A folder whose known facts were not built by this run's settings (a baseline written by
    another margin or an older version) is refused on resume, not silently measured on."""
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit"])
    _tune(tmp_path, model, config)
    path = tmp_path / "run" / "baseline.json"
    data = json.loads(path.read_text())
    assert data["probe_spec"]["margin"] == config.known_margin
    data["probe_spec"]["margin"] = 0.0
    path.write_text(json.dumps(data))
    with pytest.raises(MetakeError, match="other settings.*margin 0.0"):
        _tune(tmp_path, model, config)
    del data["probe_spec"]  # as older versions wrote it: the facts themselves are re-checked
    path.write_text(json.dumps(data))
    weak = [0.2] * len(data["probe"])
    monkeypatch.setattr(probe, "answer_margins", lambda model, tok, facts, batch_size=16: weak)
    with pytest.raises(MetakeError, match="lead by less than 1 nats"):
        _tune(tmp_path, model, config)


def test_selection_rule_guards():
    """Spe. within 1 point, perplexity within 2%, known facts >= 95%: else flagged."""
    base = {"efficacy": 20.0, "generalization": 20.0, "specificity": 30.0, "perplexity": 10.0}
    good = {
        "efficacy": 80.0,
        "generalization": 60.0,
        "specificity": 29.5,
        "perplexity": 10.1,
        "probe_kept": 1.0,
    }
    assert violations(good, base) == []
    bad_spe = {**good, "specificity": 28.9}
    bad_ppl = {**good, "perplexity": 10.3}
    bad_probe = {**good, "probe_kept": 0.9}
    for bad in (bad_spe, bad_ppl, bad_probe):
        assert len(violations(bad, base)) == 1
    better_but_bad = {**bad_ppl, "efficacy": 99.0}
    assert max([good, better_but_bad], key=lambda r: selection_key(r, base)) is good


def test_selection_rule_prefers_an_edit_to_doing_nothing():
    """A setting that changes nothing passes every damage guard; it is chosen only when no
    candidate edits (Eff. at least 10 points over unedited), whatever guards the editing ones break.
    """
    base = {"efficacy": 20.0, "generalization": 20.0, "specificity": 30.0, "perplexity": 10.0}
    idle = {**base, "efficacy": 25.0, "probe_kept": 1.0}
    assert violations(idle, base) == ["does not edit (Eff. +5.0 < +10)"]
    damaging = {**base, "efficacy": 80.0, "perplexity": 10.5, "probe_kept": 0.8}
    worse = {**damaging, "efficacy": 90.0, "specificity": 20.0}
    assert len(violations(damaging, base)) == 2
    pick = max([idle, worse, damaging], key=lambda r: selection_key(r, base))
    assert pick is damaging  # edits, then fewer broken guards than `worse`
    assert max([idle, worse], key=lambda r: selection_key(r, base)) is worse
    strict = max([idle, damaging], key=lambda r: selection_key(r, base, min_gain=70.0))
    assert strict is idle  # neither edits by 70 points: fewest broken conditions


def test_bad_input_gets_clear_errors(tmp_path):
    """Unknown method, overlapping splits, an empty dev split, too few known facts."""
    with pytest.raises(MetakeError, match="unknown method"):
        _config(tmp_path, methods=["memit", "magic"])
    with pytest.raises(MetakeError, match="overlaps the evaluation split"):
        _config(tmp_path, dev_records="0:4", eval_records="3:10")
    with pytest.raises(MetakeError, match="not a range"):
        _config(tmp_path, dev_records="5")
    with pytest.raises(MetakeError, match="overlaps --dev-records"):
        _config(tmp_path, probe_data=str(_zsre_file(tmp_path)), probe_records="2:3")
    model = tiny_model("llama")
    with pytest.raises(MetakeError, match="holds no valid record"):
        Tuner(
            _config(tmp_path, dev_records="100:200"),
            tmp_path / "x",
            model,
            tiny_tokenizer(),
            corpus=TextCorpus.from_texts(TEXTS, name="t"),
        )
    with pytest.raises(MetakeError, match="knows only"):
        _tune(tmp_path, model, _config(tmp_path, min_known_facts=5, max_probe_facts=6), out="few")
    with pytest.raises(MetakeError, match="--max-probe-facts must be at least 5"):
        _config(tmp_path, min_known_facts=5, max_probe_facts=4)


def test_preset_file_for_another_model_is_refused(tmp_path):
    """A tuned preset names its model (match); another model refuses it."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"x-tuned": {"match": {"model_type": "gpt2"}, "layers": [0]}}))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="made for a model"):
        memit_hparams(model.config, str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        memit_hparams(model.config, str(path))


def test_edit_windows_end_where_the_effect_fades():
    """Windows end 2 before, at and 2 after the last layer with >= 1/4 of the peak effect."""
    ie = [0.042, 0.048, 0.054, 0.011, 0.019, 0.026, 0.021, 0.019, 0.013, 0.008] + [0.001] * 20
    assert tune.edit_windows(ie, 5, 30) == [(1, 2, 3, 4, 5), (3, 4, 5, 6, 7), (5, 6, 7, 8, 9)]
    # clipped at both ends, duplicates dropped
    assert tune.edit_windows([0.0, 1.0, 0.0, 0.0], 2, 4) == [(1, 2), (2, 3)]
    assert tune.edit_windows([0.0, 0.1, 0.2, 1.0], 3, 4) == [(1, 2, 3)]


def test_a_best_value_at_the_grids_edge_gets_one_step_beyond():
    assert tune._beyond_edge([0.03, 0.1, 0.3], 0.3) == 0.9
    assert tune._beyond_edge([500.0, 2000.0, 8000.0], 500.0) == 125.0
    assert tune._beyond_edge([0.03, 0.1, 0.3], 0.1) is None  # bracketed
    assert tune._beyond_edge([0.3], 0.3) is None  # no step to repeat


def test_the_search_extends_past_the_edge_of_a_grid(tmp_path, cheap_grids, monkeypatch):
    """When the strongest MEMIT setting of the grid wins, weaker λ are tried beyond it."""
    monkeypatch.setattr(tune, "REFINE_ROUNDS", 0)
    config = _config(tmp_path, methods=["memit"], batch_sizes=[2])
    real_score = tune.Tuner.score

    def edit_strength_wins(self, records, probe):  # smaller λ: larger edit, and no damage
        out = real_score(self, records, probe)
        scale = getattr(self, "_lambda_now", 100.0)
        return {**out, "efficacy": 100.0 - scale / 10, "generalization": 0.0}

    real_evaluate = tune.Tuner.evaluate

    def remember_lambda(self, method, hp, batch_size, probe):
        self._lambda_now = hp.mom2_update_weight
        return real_evaluate(self, method, hp, batch_size, probe)

    monkeypatch.setattr(tune.Tuner, "score", edit_strength_wins)
    monkeypatch.setattr(tune.Tuner, "evaluate", remember_lambda)
    report = _tune(tmp_path, tiny_model("llama"), config)
    tried = {c["settings"]["mom2_update_weight"] for c in report["searched"]["memit"]}
    assert tried - {15000.0} == {0.0001, 0.01, 1.0, 100.0}  # grid 1, 100; two steps past 1
    assert report["chosen"]["memit"]["settings"]["mom2_update_weight"] == 0.0001


def test_refine_bisects_around_the_best_value_twice():
    """Round 1 halves (geometrically) the gaps to the best value's neighbours; round 2 again."""
    assert tune._refine([500.0, 2000.0, 8000.0, 32000.0], 32000.0) == [16000.0]
    assert tune._refine([500.0, 2000.0, 8000.0, 16000.0, 32000.0], 16000.0) == [11300.0, 22600.0]
    assert tune._refine([0.01, 0.1], 0.01) == [0.0316]


def test_a_setting_written_as_int_or_float_is_one_candidate(tmp_path, cheap_grids, monkeypatch):
    """The base lambda (15000.0) and a grid value 15000 are the same candidate: one row each."""
    monkeypatch.setattr(tune, "STRENGTH_GRIDS", {"memit": {"mom2_update_weight": [15000, 100.0]}})
    monkeypatch.setattr(tune, "REFINE_ROUNDS", 0)
    monkeypatch.setattr(tune, "EXTEND_ROUNDS", 0)
    _tune(tmp_path, tiny_model("llama"), _config(tmp_path, methods=["memit"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["phase"] == "search"]
    for i, a in enumerate(search):
        for b in search[i + 1 :]:
            same = (a["method"], a["batch_size"]) == (b["method"], b["batch_size"])
            assert not (same and a["settings"] == b["settings"]), (a["id"], b["id"])
    assert {r["settings"]["mom2_update_weight"] for r in search} == {15000, 100}


def test_cost_table_sums_each_part_of_the_search():
    rows = [
        {"id": "a", "phase": "stage1", "seconds": 60.0},
        {"id": "b", "phase": "targets", "seconds": 120.0},
        {"id": "c", "phase": "search", "method": "memit", "seconds": 30.0},
        {"id": "d", "phase": "search", "method": "memit", "seconds": 90.0},
    ]
    assert cost_table(rows) == [
        {"part": "Stage I lr/steps search", "rows": 1, "seconds": 60.0},
        {"part": "Stage I targets (dev split)", "rows": 1, "seconds": 120.0},
        {"part": "memit", "rows": 2, "seconds": 120.0},
    ]


def test_a_variant_starts_from_its_base_methods_choice(tmp_path, cheap_grids, monkeypatch):
    """RECT after MEMIT: no window search of its own, MEMIT's window and lambda, its own grid."""
    grids = {**tune.STRENGTH_GRIDS, "rect": {"rect_keep_fraction": [0.3, 0.7]}}
    monkeypatch.setattr(tune, "STRENGTH_GRIDS", grids)
    report = _tune(tmp_path, tiny_model("llama"), _config(tmp_path, methods=["memit", "rect"]))
    memit = report["chosen"]["memit"]["settings"]
    rect = report["searched"]["rect"]
    assert {c["settings"]["rect_keep_fraction"] for c in rect} >= {0.3, 0.7}  # (+ refinement)
    for candidate in rect:
        assert candidate["settings"]["layers"] == memit["layers"]
        assert candidate["settings"]["mom2_update_weight"] == memit["mom2_update_weight"]


def test_adopting_refuses_choices_that_do_not_edit_and_records_broken_guards(tmp_path):
    adopt = script_module("adopt_preset")
    report = {
        "baseline": {"efficacy": 17.7},
        "chosen": {
            "memit": {"efficacy": 83.4, "violations": ["known facts kept 81% < 95%"]},
            "alphaedit": {"efficacy": 31.2, "violations": []},
        },
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert adopt.check_report(path, 10.0) == []  # both edit: adoptable
    assert adopt.broken_guards(path) == {"memit": ["known facts kept 81% < 95%"]}
    report["chosen"]["rome"] = {"efficacy": 20.0, "violations": ["does not edit (Eff. +2.3 < +10)"]}
    path.write_text(json.dumps(report))
    problems = adopt.check_report(path, 10.0)
    assert len(problems) == 1 and problems[0].startswith("rome: Eff. 20.0")
    assert "rome" not in adopt.broken_guards(path)  # not editing is refused, not recorded
    missing = adopt.check_report(tmp_path / "missing.json", 10.0)
    assert missing[0].endswith("is missing: cannot check the chosen settings")


def _spy(method, calls):
    """``method`` wrapped to append its second argument (a row) to ``calls``."""

    def wrapper(self, row):
        calls.append(row)
        return method(self, row)

    return wrapper


def test_candidates_are_judged_against_the_unedited_model_on_their_own_records(
    tmp_path, cheap_grids, monkeypatch
):
    """Real-edit candidates score Eff./Gen. on the first ``search_records`` dev records: the
    rule compares them with the unedited scores on those records, fixed-target ones with the
    whole split's; Spe. is every dev record's in both (its questions are unrelated to the
    edits); a baseline.json written before the subset's scores existed gets them on resume, and
    real-edit rows that scored Spe. on their own records only are edited again."""
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit", "rome"], dev_records="0:6")
    report = _tune(tmp_path, model, config)
    tuner = Tuner(config, tmp_path / "probe", model, tiny_tokenizer(),
                  corpus=TextCorpus.from_texts(TEXTS, name="t"))  # fmt: skip
    subset = tuner.score(tuner.dev[: config.search_records], [])
    search = report["baseline_search"]
    for name in ("efficacy", "generalization", "specificity"):
        assert search[name] == pytest.approx(subset[name])
    whole = report["baseline"]
    assert any(search[k] != pytest.approx(whole[k]) for k in ("efficacy", "generalization"))
    assert search["specificity"] == pytest.approx(whole["specificity"])
    assert search["specificity_records"] == len(tuner.dev)
    for c in report["searched"]["rome"]:
        assert c["unedited"] == search
        assert c["violations"] == tune.violations(c, search, config.min_efficacy_gain)
    assert all(c["unedited"] == report["baseline"] for c in report["searched"]["memit"])
    assert "On the first 2 dev records" in (tmp_path / "run" / "report.md").read_text()
    path = tmp_path / "run" / "baseline.json"
    data = json.loads(path.read_text())
    del data["search_scores"]
    path.write_text(json.dumps(data))
    again = _tune(tmp_path, model, config)
    assert json.loads(path.read_text())["search_scores"] == pytest.approx(search)
    assert again["chosen"] == report["chosen"]
    rows_path = tmp_path / "run" / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    real = [r for r in rows if r.get("path") == "real edits"]
    assert real and all(r["specificity_records"] == len(tuner.dev) for r in real)
    for row in real:  # as an older version wrote them
        del row["specificity_records"]
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = []
    monkeypatch.setattr(tune.Tuner, "_record", _spy(tune.Tuner._record, edited))
    third = _tune(tmp_path, model, config)
    assert {r["id"] for r in edited if r.get("path") == "real edits"} == {r["id"] for r in real}
    assert third["chosen"] == report["chosen"]


def test_prune_candidates_take_memits_scores_where_nothing_would_be_restrained(
    tmp_path, cheap_grids, monkeypatch
):
    """PRUNE edits as MEMIT does and restrains only singular values of the accumulated edit at
    or above sigma_max: where MEMIT's row shows none (``edit_sigma_ratio`` < 1) PRUNE's row takes
    its scores without editing; without that figure PRUNE edits, and takes MEMIT's scores only
    if its finalize restrained nothing."""
    monkeypatch.setitem(tune.STRENGTH_GRIDS, "memit", {"mom2_update_weight": [1.0, 15000.0]})
    model = tiny_model("llama")
    config = _config(tmp_path, methods=["memit", "prune"])
    report = _tune(tmp_path, model, config)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "rows.jsonl").open())}
    memit = [r for r in rows.values() if r.get("method") == "memit"]
    assert memit and all(r["edit_sigma_ratio"] > 0 for r in memit)
    prune = [r for r in rows.values() if r.get("method") == "prune"]
    below = [r for r in prune if rows.get(_twin_id(r), {}).get("edit_sigma_ratio", 9) < 1]
    assert below and all(r["same_as"] == _twin_id(r) and r["seconds"] == 0.0 for r in below)
    for r in below:
        twin = rows[r["same_as"]]
        assert all(r[k] == twin[k] for k in ("efficacy", "specificity", "probe_kept"))
    strong = [r for r in prune if r not in below]
    assert strong  # no twin, or an edit above sigma_max: PRUNE edited and scored on its own
    assert all("same_as" not in r and r["seconds"] > 0 for r in strong)
    # twins without the ratio (an older run's rows): PRUNE edits and checks its finalize
    edited = []
    real_finalize = Editor.finalize

    def finalize(self):
        edited.append(self.method)
        return real_finalize(self)

    monkeypatch.setattr(Editor, "finalize", finalize)
    lines = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").open()]
    kept = [{k: v for k, v in r.items() if k != "edit_sigma_ratio"} for r in lines
            if r.get("method") != "prune"]  # fmt: skip
    (tmp_path / "run" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    again = _tune(tmp_path, model, config)
    assert edited and set(edited) == {"prune"}
    assert again["chosen"]["prune"]["settings"] == report["chosen"]["prune"]["settings"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").open()]
    redone = [r for r in rows if r.get("method") == "prune"]
    assert {r["id"] for r in redone} == {r["id"] for r in prune}
    assert [("same_as" in r) for r in redone] == [("same_as" in r) for r in prune]


def _twin_id(row):
    return tune.search_row_id("memit", row["batch_size"], row["settings"])


def test_prune_that_restrains_nothing_leaves_memits_weights_bit_for_bit(tmp_path):
    """Below sigma_max PRUNE's map is the identity: the finalized weights are MEMIT's exactly."""
    model = tiny_model("llama")
    weights = {}
    for method in ("memit", "prune"):
        editor = Editor(model, tiny_tokenizer(), method, hparams=memit_hparams(
            model.config, None, layers=[1], v_steps=3, mom2_samples=4, mom2_update_weight=15000.0),
            corpus=TextCorpus.from_texts(TEXTS, name="t"),
            stats_cache=StatsCache(tmp_path / "stats"), progress=False)  # fmt: skip
        editor.edit([EditRequest("{} lives in", "Anna Berg", "Oslo")])
        restrained = editor.finalize()
        if method == "prune":
            assert restrained == {1: 0}
        weights[method] = model.model.layers[1].mlp.down_proj.weight.detach().clone()
        editor.restore()
    assert torch.equal(weights["memit"], weights["prune"])
