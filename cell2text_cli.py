"""The `cell2text` command's parser and entry point, importable without torch and transformers.

`cell2text --version`, `--help` and a mistyped option answer from here at once; a command that runs imports
`modeling_cell2text.cli` (and with it the package, torch and transformers: 5-30 s) after its arguments parse. This is
a top-level module, not part of the package, because importing any of `modeling_cell2text`'s modules runs its
`__init__`, which registers the Auto classes. What the parser states of the package (the dtypes, the version) is the
package's (`modeling_cell2text/package_info.py`, read here without the package's `__init__`); what an integer option
takes (`positive_int`) is owned here and imported by the other command lines.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def _package_info() -> ModuleType:
    """The package's `package_info` module (standard library only), run from its file: `import
    modeling_cell2text.package_info` would run the package's `__init__` (torch, transformers) first."""
    package = importlib.util.find_spec("modeling_cell2text")  # locates the package the same import would, runs nothing
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("cell2text: the modeling_cell2text package is not importable; install Cell2Text "
                                  "(pip install . in its checkout)", name="modeling_cell2text")
    path = Path(next(iter(package.submodule_search_locations))) / "package_info.py"
    spec = importlib.util.spec_from_file_location("_cell2text_package_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PACKAGE_INFO = _package_info()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value



class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a missing input file after --cell-types (which takes every value after it, the input's
    path too) says so."""

    def error(self, message: str):
        if "required: input" in message and any(a.dest == "cell_types" for a in self._actions):
            message += (" (--cell-types takes every value after it, the input file's too: give the input file "
                        "before --cell-types, or --cell-types last)")
        super().error(message)


def _add_common_arguments(command: argparse.ArgumentParser, key: str, batch_size: int) -> None:
    command.add_argument("input", type=Path, help="input .h5ad (never modified)")
    command.add_argument("--model", required=True, help="model folder or Hub repo (model + processor)")
    command.add_argument("--out", required=True, type=Path,
                         help="output .h5ad (a new file, not the input; named *.h5ad)")
    command.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    command.add_argument("--key-added", default=key, help=f"name of the new annotations (default {key})")
    command.add_argument("--batch-size", type=positive_int, default=batch_size,
                         help=f"cells processed together (default {batch_size})")
    command.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N or mps")
    command.add_argument("--dtype", choices=("auto", *_PACKAGE_INFO.DTYPE_NAMES), default="auto",
                         help="model weights' dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    source = command.add_mutually_exclusive_group()
    source.add_argument("--layer", default=None, help="AnnData layer holding the expression (default: X)")
    source.add_argument("--use-raw", action="store_true", help="read the counts in adata.raw (CELLxGENE's layout)")
    command.add_argument(
        "--input-values", choices=("counts", "normalized", "log1p"), default="counts",
        help="what the expression values are (default: raw counts)",
    )
    command.add_argument(
        "--skip-empty-cells", action="store_true",
        help="leave cells that express none of the model's genes out instead of stopping",
    )
    command.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the Python code in the model folder or repo (off: the installed package's classes load it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cell2text", description="Describe single cells with a Cell2Text model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_PACKAGE_INFO.package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    describe = commands.add_parser("describe", help="Write a description and parsed fields per cell into obs.")
    _add_common_arguments(describe, "cell2text", 16)
    describe.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help="longest free description (--free) in tokens (default: the model folder's "
                               "generation_config.json, else 160); one cut there keeps its "
                               "text with <key>_parsed False and no fields")
    describe.add_argument("--free", "--free-cell-type", action="store_true", dest="free",
                          help="let the model write the whole description freely (default: every field chosen among "
                               "the training corpus's labels, with its probability in <key>_<field>_score)")
    describe.add_argument("--sort-by-length", action="store_true",
                          help="batch cells of similar gene counts together (less padding, faster; float32 can change "
                               "the last digits of <key>_cell_type_score)")
    describe.add_argument("--cell-types", nargs="+", action="extend", metavar="LABEL", default=None,
                          help="choose the cell type among these of the model's labels only (cells known to be of a "
                               "few types); after the input file, each label quoted or given by its Cell Ontology "
                               "id: --cell-types 'B cell' CL:0000084")
    describe.add_argument("--compile", action="store_true",
                          help="static KV cache and torch.compile for free decoding (--free) on a CUDA GPU (no effect "
                               "elsewhere)")
    embed = commands.add_parser("embed", help="Write per-cell embeddings (the gene encoder's) into obsm.")
    _add_common_arguments(embed, "X_cell2text", 64)
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cell2text` console script: parse here (--version, --help and usage errors need no torch),
    then run the command (`modeling_cell2text.cli.main`, which parses the same arguments again)."""
    build_parser().parse_args(argv)
    from modeling_cell2text.cli import main as run_command

    return run_command(argv)
