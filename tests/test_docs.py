"""The docs' promises that a reader acts on: every relative link resolves (file and heading), and every ``gcml``
command quoted in them names a subcommand and flags that ``gcml`` accepts."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from gcml_app.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(gcml [^`]+)`")
SUBCOMMANDS = "|".join(sorted(next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices,
                              key=len, reverse=True))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links():
    for doc in DOCS:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if not re.match(r"[a-z]+:", target):
                yield doc, target


@pytest.mark.parametrize("doc, target", list(_links()), ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name}: link to {target}: {file} does not exist"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file), f"{doc.name}: link to {target}: no heading with that anchor in {file.name}"


def _commands():
    """``gcml ...`` as quoted: each line of a shell block (continuations joined, comments dropped) and each
    inline code span."""
    for doc in DOCS:
        text = doc.read_text()
        for lang, block in FENCE.findall(text):
            if lang not in ("", "bash", "sh"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if re.match(rf"gcml ({SUBCOMMANDS}|-)", line):  # not printed output ("gcml config error in ...")
                    yield doc, line
        for span in INLINE.findall(FENCE.sub("", text)):
            yield doc, span


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser the leading words choose, and the words left."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


@pytest.mark.parametrize("doc, command", list(_commands()), ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_quoted_gcml_command_names_flags_gcml_accepts(doc, command):
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
    parser, rest = _subparser(_parser(), words)
    assert parser.prog != "gcml", f"{doc.name}: `{command}`: no such subcommand"
    known = {s for a in parser._actions for s in a.option_strings}
    flags = [w.split("=")[0].rstrip(").,;:") for w in rest if w.startswith("--")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{doc.name}: `{command}`: {parser.prog} has no {unknown}"


def test_readme_stays_a_front_door():
    """The README gets a newcomer running and links out; the detail lives in docs/ (one page per reader)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", "\n".join(lines)))
    assert linked == {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}, "every docs page linked from the README"
