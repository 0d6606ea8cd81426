"""README and docs/ stay true to the repository: their links resolve, their Python parses and imports names this
project and transformers define, and the commands they show (in blocks and inline) name modules, scripts and config
files that exist, with options their command lines take."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_COMMAND = re.compile(r"`((?:python|bash|accelerate launch|torchrun) [^`]+)`")
MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
#: Packages whose names a page's Python imports are checked against (other imports need optional extras).
CHECKED_PACKAGES = {"modeling_cell2text", "processing", "training", "hub_cards", "transformers"}


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'. A `#`
    line inside a code block (a shell comment) is no heading."""
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
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
    """The commands of the bash blocks (continuation lines joined, comments dropped) and of inline code in the text
    (`python -m ...`, `bash x.sh`, ...), as argument lists."""
    lines = []
    for block in code_blocks(page, "bash"):
        lines += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    lines += INLINE_COMMAND.findall(FENCE.sub("", page.read_text()))
    return [words(line.replace("[", "").replace("]", "")) for line in lines if line and not line.startswith("#")]


def words(line: str) -> list[str]:
    """A command's arguments as the shell splits them; by whitespace where its text does not quote (`<the model's>`)."""
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def program_and_options(words: list[str]) -> tuple[Path | None, list[str]]:
    """The project file whose command line takes a command's options (a `-m` module's, a script's, the `cell2text`
    CLI's; None for other programs), and the `--options` after it (an `=value` dropped)."""
    for i, word in enumerate(words):
        path = None
        if word == "-m" and i + 1 < len(words) and MODULE.fullmatch(words[i + 1]):
            module = ROOT.joinpath(*words[i + 1].split("."))  # found without importing its package
            path = next((p for p in (module.with_suffix(".py"), module / "__main__.py") if p.is_file()), None)
            rest = words[i + 2:]
        elif word.endswith(".py"):
            path, rest = ROOT / word, words[i + 1:]
        elif word == "cell2text" and i == 0:
            path, rest = ROOT / "cell2text_cli.py", words[1:]  # the console script's parser
        if path == ROOT / "modeling_cell2text" / "cli.py":  # `-m modeling_cell2text.cli`: cell2text_cli's parser
            path = ROOT / "cell2text_cli.py"
        if path is not None and path.is_file():
            return path, [w.split("=")[0] for w in rest if w.startswith("--")]
    return None, []


@functools.lru_cache
def known_options(path: Path) -> set[str]:
    """The options a project file's command line takes: `--help`, the `--name` literals of its source (argparse's
    add_argument), and for the recipe (training/sft.py, TRL's parser of dataclasses) its parser's option strings and
    TRL's `--config`."""
    options = {"--help", *re.findall(r"""["'](--[a-z][\w-]*)["']""", path.read_text())}
    if path == ROOT / "training" / "sft.py":
        from training.sft import make_parser

        options |= {"--config", *make_parser()._option_string_actions}
    return options


def imported_names(block: str) -> list[tuple[str, str | None]]:
    """(module, name) for each `from module import name` and (module, None) for each `import module` of a block."""
    names = []
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
    return names


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
def test_every_python_block_imports_names_that_exist(page):
    missing = []
    for block in code_blocks(page, "python"):
        for module, name in imported_names(block):
            if module.partition(".")[0] not in CHECKED_PACKAGES:
                continue
            if importlib.util.find_spec(module) is None:
                missing.append(module)
            elif name is not None and not hasattr(importlib.import_module(module), name) \
                    and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{module}.{name}")
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_commands_shown_name_modules_scripts_and_configs_that_exist(page):
    missing = []
    for words in command_lines(page):
        for flag, value in zip(words, words[1:]):
            if flag == "-m" and MODULE.fullmatch(value) and importlib.util.find_spec(value) is None:
                missing.append(value)
            if flag in ("--config", "--config_file") and not (ROOT / value).is_file():
                missing.append(value)
        if words[0] in ("python", "bash") and len(words) > 1 and words[1].endswith((".py", ".sh")):
            if not (ROOT / words[1]).is_file():
                missing.append(words[1])
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_commands_shown_take_the_options_they_are_given(page):
    unknown = []
    for words in command_lines(page):
        path, options = program_and_options(words)
        if path is not None:
            unknown += [f"{path.relative_to(ROOT)} {option}" for option in options if option not in known_options(path)]
    assert unknown == []


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Its section: the details\n```bash\n# no heading\n```\n")
    page.write_text("[a](other.md#its-section-the-details) [b](missing.md) [c](other.md#no-such) "
                    "[d](https://example.org/x.md)\n```bash\n[e](inside-a-block.md)\n```\n")
    assert relative_links(page) == ["other.md#its-section-the-details", "missing.md", "other.md#no-such"]
    assert heading_anchors((tmp_path / "other.md").read_text()) == {"other-page", "its-section-the-details"}


def test_the_command_and_import_checks_read_what_a_page_shows(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python -m training.nonexistent --x 1` or `bash scripts/none.sh`; `python -m ...`.\n"
                    "```bash\npython -m processing.build_corpus \\\n    --out DIR   # a comment\n```\n")
    assert command_lines(page) == [["python", "-m", "processing.build_corpus", "--out", "DIR"],
                                   ["python", "-m", "training.nonexistent", "--x", "1"], ["bash", "scripts/none.sh"],
                                   ["python", "-m", "..."]]
    assert program_and_options(["accelerate", "launch", "--num_processes", "2", "-m", "training.demo", "--seed=1",
                                "--out", "x"]) == (ROOT / "training" / "demo.py", ["--seed", "--out"])
    assert program_and_options(["cell2text", "describe", "--model", "m"]) == (ROOT / "cell2text_cli.py", ["--model"])
    assert program_and_options(["pip", "install", "--no-deps", "x"]) == (None, [])
    assert "--reuse-models" in known_options(ROOT / "training" / "demo.py")
    assert {"--corpus_dir", "--learning_rate"} <= known_options(ROOT / "training" / "sft.py")
    assert "--no-such-option" not in known_options(ROOT / "training" / "demo.py")
    assert imported_names("import anndata as ad\nfrom modeling_cell2text import tl, no_such\n") == [
        ("anndata", None), ("modeling_cell2text", "tl"), ("modeling_cell2text", "no_such")]
