"""README and docs/ stay true to the repository: their links resolve, their Python parses, and the commands they
show name modules, scripts and config files that exist."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def code_blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def command_lines(page: Path) -> list[list[str]]:
    """The bash blocks' commands as argument lists, continuation lines joined and comments dropped."""
    commands = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.replace("[", "").replace("]", "")))
    return commands


def test_the_pages_are_found():
    names = {page.name for page in PAGES}
    assert {"README.md", "describing.md", "model.md", "corpus.md", "training.md", "evaluation.md", "publishing.md",
            "results.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_names_a_file_and_heading_that_exist(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_python_block_parses(page):
    for block in code_blocks(page, "python"):
        ast.parse(block)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_commands_shown_name_modules_scripts_and_configs_that_exist(page):
    missing = []
    for words in command_lines(page):
        for flag, value in zip(words, words[1:]):
            if flag == "-m" and importlib.util.find_spec(value) is None:
                missing.append(value)
            if flag in ("--config", "--config_file") and not (ROOT / value).is_file():
                missing.append(value)
        if words[0] in ("python", "bash") and len(words) > 1 and words[1].endswith((".py", ".sh")):
            if not (ROOT / words[1]).is_file():
                missing.append(words[1])
    assert missing == []


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Its section: the details\n")
    page.write_text("[a](other.md#its-section-the-details) [b](missing.md) [c](other.md#no-such) "
                    "[d](https://example.org/x.md)\n```bash\n[e](inside-a-block.md)\n```\n")
    assert relative_links(page) == ["other.md#its-section-the-details", "missing.md", "other.md#no-such"]
    assert heading_anchors((tmp_path / "other.md").read_text()) == {"other-page", "its-section-the-details"}
