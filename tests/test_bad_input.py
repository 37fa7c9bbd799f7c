"""Every row of the bad-input table in docs/reliability.md, run: one clear line, no traceback,
nothing changed (issue 18). The table is the single source: add a row there to test it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from metake import Editor
from metake.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def _rows() -> list[tuple[str, str]]:
    """``(input, message)`` of each table row between the markers."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- bad-input-table -->")[1].split("<!-- /bad-input-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = re.findall(r"`([^`]*)`", line)
        assert len(cells) == 2, f"malformed row in {DOC.name}: {line}"
        rows.append((cells[0], cells[1]))
    return rows


ROWS = _rows()


def test_the_table_covers_every_entry_point():
    assert len(ROWS) >= 20
    commands = {row[0].split()[1] for row in ROWS if row[0].startswith("metake ")}
    assert commands >= {"edit", "bench", "tune", "stats", "diagnose"}
    assert any(not row[0].startswith("metake ") for row in ROWS)  # the Python API too


@pytest.fixture()
def files(model_dir, tmp_path, monkeypatch):
    """MODEL, CORPUS and DATA for the commands; the working folder is a fresh one."""
    folder, corpus = model_dir
    data = tmp_path / "zsre.json"
    records = [{"subject": n, "src": f"Where does {n} live?", "rephrase": f"{n} lives where?",
                "answers": [c], "alt": "Paris", "loc": "nq question: sky", "loc_ans": "blue"}
               for n, c in (("Anna Berg", "Oslo"), ("Carl Dunn", "Lima"))]  # fmt: skip
    data.write_text(json.dumps(records), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"MODEL": str(folder), "CORPUS": str(corpus), "DATA": str(data)}


@pytest.mark.parametrize("command, message", [r for r in ROWS if r[0].startswith("metake ")],
                         ids=[r[0][:60] for r in ROWS if r[0].startswith("metake ")])  # fmt: skip
def test_each_bad_command_gets_its_one_line_message(command, message, files, capsys):
    argv = [files.get(arg, arg) for arg in shlex.split(command)[1:]]
    with pytest.raises(SystemExit) if "argument --" in message else _no_exit():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


class _no_exit:
    """A context manager that expects no exception (argparse errors exit, ours return 2)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("code, message", [r for r in ROWS if not r[0].startswith("metake ")])
def test_each_bad_api_call_gets_its_message_and_changes_nothing(code, message):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    namespace = {"model": model, "tok": tok, "Editor": Editor,
                 "editor": Editor(model, tok, layers=[1], progress=False)}  # fmt: skip
    with pytest.raises(ValueError if "must be" in message else Exception) as raised:
        exec(code, namespace)  # noqa: S102 - the table's own rows
    assert message in str(raised.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
