"""The command line on a tiny model saved to a folder: JSON output, saving, clear errors."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import pytest

from metake.cli import main
from metake.hparams import memit_hparams

FAST = ["--layers", "0,1", "--samples", "8", "--set", "v_steps=2", "--set", "context_count=1",
        "--set", "mom2_update_weight=10", "--device", "cpu", "--max-new-tokens", "5"]  # fmt: skip


def test_edit_json_output_and_save(model_dir, tmp_path, capsys):
    folder, corpus = model_dir
    out_dir = tmp_path / "edited"
    code = main(["edit", "--model", str(folder), "--corpus", str(corpus), *FAST,
                 "--prompt", "{} lives in", "--subject", "Anna Berg", "--target", "Oslo",
                 "--check", "The river", "--json", "--save", str(out_dir)])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"requests", "seconds", "peak_memory_mb", "checks", "report"}
    (request,) = result["requests"]
    assert request["prompt"] == "{} lives in" and request["target_new"] == "Oslo"
    assert request["subject"] == "Anna Berg"
    for key in ("before", "after", "p_target_before", "p_target_after"):
        assert key in request
    assert 0 <= request["p_target_after"] <= 1 and result["peak_memory_mb"] > 0
    assert result["report"]["layers"] == [0, 1]
    assert all(n > 0 for n in result["report"]["statistics_tokens"].values())
    assert (out_dir / "metake_deltas.safetensors").is_file()
    assert (out_dir / "config.json").is_file()


def test_stats_command_reports_tokens(model_dir, capsys):
    folder, corpus = model_dir
    code = main(["stats", "--model", str(folder), "--corpus", str(corpus), "--layers", "0,2",
                 "--samples", "6", "--device", "cpu"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "layer 0:" in out and "layer 2:" in out and "tokens" in out
    assert "null space" in out and "rank" in out
    # the printed token count is the number of corpus tokens the statistics were taken over
    from metake.corpus import load_corpus
    from metake.models import load_model

    model, tokenizer = load_model(str(folder), device="cpu")
    texts = list(itertools.islice(load_corpus(str(corpus)).iter_texts(), 6))
    hp = memit_hparams(model.config, mom2_samples=6)
    expected = sum(len(tokenizer(t, truncation=True, max_length=hp.mom2_max_length)["input_ids"])
                   for t in texts)  # fmt: skip
    printed = {int(m.group(1)): int(m.group(2))
               for m in re.finditer(r"layer (\d+): C0 \S+ \S+ over (\d+) tokens", out)}  # fmt: skip
    assert printed == {0: expected, 2: expected}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "lives in", "--subject", "Anna", "--target", "Oslo"], "placeholder"),
        (["--prompt", "{} lives in", "--subject", "Anna"], "--target"),
        (
            ["--prompt", "{} x", "--subject", "A", "--target", "B", "--requests", "f.json"],
            "not both",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(["edit", *args]) == 2
    err = capsys.readouterr().err
    assert "metake: error:" in err and message in err and "Traceback" not in err


def test_group_rows_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--prompt", "{} x", "--subject", "A", "--target", "B", "--group-rows", "0"])
    assert exit_info.value.code == 2
    assert "--group-rows: expected a positive whole number, got '0'" in capsys.readouterr().err


def test_malformed_requests_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "{} is", "subject": "A", "target_new": "B"},')
    assert main(["edit", "--requests", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


def test_presets_lists_models_and_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "gpt2-xl" in out


def test_metake_over_a_solver_prints_the_lookahead(model_dir, capsys):
    folder, corpus = model_dir
    code = main(["edit", "--model", str(folder), "--corpus", str(corpus), *FAST,
                 "--method", "metake", "--solver", "memit", "--set", "metake_steps=3",
                 "--prompt", "{} lives in", "--subject", "Anna Berg",
                 "--target", "Oslo"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "MetaKE look-ahead (memit gate): meta-loss" in out
    assert "with metake over memit at layers [0, 1]" in out


def test_solver_needs_method_metake(capsys):
    args = ["edit", "--method", "memit", "--solver", "rome", "--prompt", "{} lives in",
            "--subject", "Anna", "--target", "Oslo"]  # fmt: skip
    assert main(args) == 2
    assert "for metake methods only" in capsys.readouterr().err


def test_methods_lists_methods_and_their_hyperparameters(capsys):
    assert main(["methods", "--preset", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    for name in ("rome", "memit", "alphaedit", "metake", "metake_lr", "nullspace_threshold"):
        assert name in out
    assert "mom2_update_weight       2000" in out


def test_bench_command_runs_and_resumes(model_dir, tmp_path, capsys):
    folder, corpus = model_dir
    data = tmp_path / "own.jsonl"
    rows = [
        {
            "prompt": "{} lives in",
            "subject": name,
            "target_new": city,
            "rephrase_prompts": [f"The home of {name} is"],
        }
        for name, city in (("Anna Berg", "Oslo"), ("Carl Dunn", "Lima"), ("Eva Holm", "Rome"))
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "run"
    args = ["bench", "--model", str(folder), "--corpus", str(corpus), "--device", "cpu",
            "--dataset", "requests", "--data", str(data), "--methods", "memit,metake+memit",
            "--edits", "2", "--batch-size", "1", "--seeds", "0", "--drift-texts", "2",
            "--fluency-records", "1", "--out", str(out), "--layers", "0,1", "--group-rows", "3",
            "--set", "v_steps=2", "--set", "context_count=1", "--set", "metake_steps=1",
            "--set", "mom2_samples=8", "--set", "mom2_update_weight=10"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| memit |" in printed and "| metake+memit |" in printed
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["dataset"]["skipped_records"] == 1
    assert results["config"]["command"].startswith("metake bench")
    assert results["config"]["group_rows"] == 3
    assert main(["bench", "--resume", str(out)]) == 0  # everything done: just the report again
    assert "| memit |" in capsys.readouterr().out
    assert results["config"]["dtype"] == "float32"  # recorded: it changes results
    assert main(["bench", "--resume", str(out), "--dtype", "bfloat16"]) == 2
    assert "the run used --dtype float32, not bfloat16" in capsys.readouterr().err
    assert main(["bench", "--progress", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("seed 0:") and "| metake+memit |" in printed
    assert "pending" not in printed
    # the output piped into a reader that closed early (`| head`): progress.md still written,
    # no traceback
    (out / "progress.md").unlink()
    command = [sys.executable, "-m", "metake", "bench", "--progress", str(out)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()
    assert reader.wait(timeout=120) == 1
    assert "Traceback" not in reader.stderr.read().decode()
    assert (out / "progress.md").is_file()


def test_bench_without_data_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("METAKE_COUNTERFACT_DATA", raising=False)
    assert main(["bench", "--dataset", "counterfact"]) == 2
    assert "METAKE_COUNTERFACT_DATA" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "memit,magic"], "unknown method"),
        (["--dev-records", "0:100", "--eval-records", "50:60"], "overlaps the evaluation split"),
        (["--dev-records", "100"], "not a range"),
    ],
)
def test_tune_bad_input_is_one_clear_line(tmp_path, args, message, capsys):
    """metake tune refuses bad splits and methods before loading anything."""
    zsre = tmp_path / "z.json"
    zsre.write_text("[]", encoding="utf-8")
    assert main(["tune", "--data", str(zsre), "--out", str(tmp_path / "t"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "setting, message",
    [
        ("v_lr=abc", "v_lr must be a number, got 'abc'"),
        ("v_steps=2.5", "v_steps must be a whole number, got 2.5"),
        ("alphaedit_lambda=0", "'alphaedit_lambda' must be positive"),
        ("nullspace_relative=maybe", "nullspace_relative must be true or false"),
        ("layers=a,b", "layers must be a whole number, got 'a'"),
        ("no_such_thing=1", "unknown hyper-parameter(s) no_such_thing"),
    ],
)
def test_typed_set_values_get_one_line_errors(model_dir, capsys, setting, message):
    folder, corpus = model_dir
    request = ["--prompt", "{} lives in", "--subject", "Anna Berg", "--target", "Oslo"]
    fast = [a for a in FAST if a not in ("--layers", "0,1")] + ["--set", "layers=0,1"]
    code = main(["edit", "--model", str(folder), "--corpus", str(corpus), *fast, "--set", setting,
                 *request])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_set_layers_accepts_a_comma_list(model_dir, capsys):
    folder, corpus = model_dir
    args = [a for a in FAST if a not in ("--layers", "0,1")]
    code = main(["edit", "--model", str(folder), "--corpus", str(corpus), *args, "--set",
                 "layers=0,1", "--prompt", "{} lives in", "--subject", "Anna Berg", "--target",
                 "Oslo", "--json"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["report"]["layers"] == [0, 1]


def test_edit_resumes_a_saved_session(model_dir, tmp_path, capsys):
    folder, corpus = model_dir
    first = tmp_path / "first"
    assert main(["edit", "--model", str(folder), "--corpus", str(corpus), *FAST, "--method",
                 "alphaedit", "--prompt", "{} lives in", "--subject", "Anna Berg", "--target",
                 "Oslo", "--json", "--save", str(first)]) == 0  # fmt: skip
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["edit", "--resume-session", str(first), "--corpus", str(corpus), "--device",
                 "cpu", "--prompt", "The home of {} is", "--subject", "Carl Dunn", "--target",
                 "Lima", "--json", "--save", str(second)]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "alphaedit" and result["report"]["layers"] == [0, 1]
    edits = json.loads((second / "metake_edits.json").read_text())
    assert [r["subject"] for r in edits["requests"]] == ["Anna Berg", "Carl Dunn"]
    code = main(["edit", "--resume-session", str(first), "--method", "memit", "--prompt",
                 "{} is", "--subject", "Eva", "--target", "Rome"])  # fmt: skip
    assert code == 2 and "drop --method" in capsys.readouterr().err
