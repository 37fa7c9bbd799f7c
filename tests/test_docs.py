"""The documentation holds together (issue 16): README.md and docs/*.md.

* every relative Markdown link and image points to an existing file, and every ``#anchor`` into
  a Markdown file names one of its headings (GitHub's slugs);
* every ``metake SUBCOMMAND --option`` quoted in a code span or code block names a sub-command
  of the real parser (``metake.cli.build_parser``) and options that sub-command accepts;
* the README stays a user's guide: at most 250 lines.

No model is loaded; the parser is built, never run.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from metake.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _rel(path: Path) -> str:
    """A path as the messages name it: relative to the repository where it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------------------ Markdown parsing

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*\"([^\"]+)\"", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


@dataclass
class Parsed:
    """One Markdown file split into prose (code blocks blanked) and code-block lines."""

    prose: str
    blocks: list[list[str]]


def parse(text: str) -> Parsed:
    """Separate fenced code blocks from prose, keeping the prose's line structure."""
    prose: list[str] = []
    blocks: list[list[str]] = []
    fence: str | None = None
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            blocks.append([])
            prose.append("")
        elif fence is not None:
            closing = line.strip()
            if set(closing) == {fence[0]} and len(closing) >= len(fence):
                fence = None
            else:
                blocks[-1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return Parsed("\n".join(prose), blocks)


def code_spans(prose: str) -> list[str]:
    """The contents of the inline code spans (which may wrap over lines of a paragraph)."""
    return [m.group(2) for m in CODE_SPAN.finditer(prose)]


def without_code_spans(prose: str) -> str:
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor GitHub gives the headings of a Markdown file (duplicates get -1, -2, ...)."""
    prose = parse(path.read_text(encoding="utf-8")).prose
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(prose))
    for line in prose.split("\n"):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return frozenset(found)


def links(text: str) -> list[str]:
    """Link and image targets outside code, as written."""
    prose = without_code_spans(parse(text).prose)
    targets = [m.group(1).strip("<>") for m in LINK.finditer(prose)]
    return targets + HTML_LINK.findall(prose)


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """What is wrong with the relative links of one file: one message per bad link."""
    text = path.read_text(encoding="utf-8") if text is None else text
    problems = []
    for target in links(text):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            problems.append(f"{_rel(path)}: link {target!r}: {file_part} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(
                f"{_rel(path)}: link {target!r}: no heading with anchor #{anchor} in {_rel(dest)}"
            )
    return problems


# ------------------------------------------------------------------------------ quoted commands

COMMAND_START = re.compile(r"(?:^|&&|\|\||;|\$\(|\s\|\s)\s*(?:\$\s+)?(metake(?:\s.*)?)$")
SEPARATOR = re.compile(r"&&|\|\||;|\s\|\s(?!-)")
LONG_OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
COMMENT = re.compile(r"\s#\s.*$")


@cache
def cli() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """The top-level options and, per sub-command, the options it accepts: from the parser."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = frozenset(o for a in parser._actions for o in a.option_strings)
    subs = {
        name: frozenset(o for a in sub._actions for o in a.option_strings)
        for name, sub in subparsers.choices.items()
    }
    return top, subs


def block_commands(lines: list[str]) -> Iterator[str]:
    """Logical command lines of a code block: backslash continuations joined, and indented
    lines after a ``metake`` line taken as its continuation (usage synopses)."""
    logical: list[str] = []
    pending = ""
    for line in lines:
        if pending:
            pending += " " + line.strip()
        elif logical and line[:1].isspace() and line.strip() and "metake" in logical[-1]:
            logical[-1] += " " + line.strip()
            continue
        else:
            pending = line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        logical.append(pending)
        pending = ""
    if pending:
        logical.append(pending)
    for line in logical:
        line = COMMENT.sub("", line)
        for part in SEPARATOR.split(line):
            match = COMMAND_START.search(part.strip())
            if match:
                yield match.group(1)


def span_commands(span: str) -> Iterator[str]:
    """A code span quoting a command: ``metake ...``, or ``SUBCOMMAND --option ...``."""
    text = " ".join(span.split())
    first, _, rest = text.partition(" ")
    if first == "metake":
        yield text
    elif first in cli()[1] and rest.startswith("--"):
        yield f"metake {text}"


def command_problems(command: str) -> list[str]:
    """Why a quoted ``metake ...`` command is not one the parser accepts (empty: it is)."""
    top, subs = cli()
    tokens = [t.strip("[](){}`'\",") for t in command.split()[1:]]
    tokens = [t for t in tokens if t]
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):
        option = tokens[i].split("=", 1)[0]
        if option not in top:
            return [f"{option} is not a top-level option of metake (no sub-command before it)"]
        i += 1
    if i == len(tokens):
        return []  # `metake`, `metake --version`
    name = tokens[i]
    if name not in subs:
        if i == 0 and not LONG_OPTION.search(command):
            return []  # prose such as `metake` over a solver, not a command line
        return [f"no sub-command {name!r} (there are: {', '.join(subs)})"]
    rest = " ".join(tokens[i + 1 :])
    return [
        f"metake {name} has no option {option}"
        for option in dict.fromkeys(LONG_OPTION.findall(rest))
        if option not in subs[name]
    ]


def quoted_commands(text: str) -> list[str]:
    parsed = parse(text)
    found = [c for block in parsed.blocks for c in block_commands(block)]
    found += [c for span in code_spans(parsed.prose) for c in span_commands(span)]
    return found


def cli_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8") if text is None else text
    return [
        f"{_rel(path)}: `{command}`: {problem}"
        for command in quoted_commands(text)
        for problem in command_problems(command)
    ]


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_relative_links_and_images_resolve(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_quoted_metake_commands_exist(path):
    problems = cli_problems(path)
    assert not problems, "commands the CLI does not accept:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_every_docs_page_is_listed_in_the_index_and_the_readme():
    index = {Path(t.partition("#")[0]).name for t in links((DOCS / "index.md").read_text())}
    readme = {
        Path(t.partition("#")[0]).name
        for t in links((ROOT / "README.md").read_text(encoding="utf-8"))
        if t.startswith("docs/")
    }
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert not pages - index, f"docs/index.md does not list {sorted(pages - index)}"
    assert not pages - readme, f"README.md does not link {sorted(pages - readme)}"


# ------------------------------------------------------------------------------ the checker itself


def test_checker_finds_bad_links_anchors_and_options(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A title: with `code`, and more\n\n## Twice\n## Twice\n")
    page.write_text(
        "[ok](there.md#a-title-with-code-and-more) [ok](there.md#twice-1) ![x](missing.png)\n"
        "[bad anchor](there.md#nope) [web](https://example.org/x) `[not a link](nowhere.md)`\n"
        "`metake edit --no-such-flag` and `metake frobnicate --x` and `metake --solver rome`\n"
        "`metake bench\n--resume DIR` `bench --methods table1` `metake` over a solver\n\n"
        "```bash\n"
        "metake tune --model m \\\n  --dev-records 0:10 --bogus 1  # a comment --ignored\n"
        "bash scripts/install.sh && metake edit --subject S --target T\n"
        "metake stats   --model M\n               [--layers 1] [--nope N]\n"
        "```\n",
        encoding="utf-8",
    )
    links_found = link_problems(page)
    assert len(links_found) == 2, links_found
    assert "missing.png does not exist" in links_found[0]
    assert "#nope" in links_found[1]
    commands = cli_problems(page)
    assert any("edit has no option --no-such-flag" in p for p in commands), commands
    assert any("no sub-command 'frobnicate'" in p for p in commands), commands
    assert any("--solver is not a top-level option" in p for p in commands), commands
    assert any("tune has no option --bogus" in p for p in commands), commands
    assert any("stats has no option --nope" in p for p in commands), commands
    assert not any("--ignored" in p or "--resume" in p or "--methods" in p for p in commands)
    assert len(commands) == 5, commands
