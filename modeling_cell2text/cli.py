"""`cell2text describe|embed cells.h5ad --model PATH --out out.h5ad`: a thin wrapper over `tl.describe`/`tl.embed`.

The input file is only read (opened backed, read-only); the output is a copy of it whose `obs` gains
`<key>_description`, `<key>_parsed` and one `<key>_<field>` column per parsed field (plus
`<key>_<field>_ontology_term_id`, and `<key>_<field>_score` and `<key>_exact_choice` where the schema decoder chose the
fields), key `cell2text` by default (`describe`), or whose `obsm[<key>]` holds the cell
embeddings, key `X_cell2text` (`embed`); `uns[<key>]` records the model and the parameters. Existing CELLxGENE
columns such as `cell_type` are left as they are.

Safe by default: the model folder's code is not run (the installed package's classes load it) unless
`--trust-remote-code`; an existing `--out` is replaced only with `--overwrite`; every path is checked before any
generation, and the output is written under a temporary name in its folder and renamed at the end (removed on any
failure, SIGTERM and SIGINT included); a run that finds --out taken by then (a second run with the same
--out) fails with the usual error instead of replacing it.

Started as several processes (`accelerate launch --multi_gpu --num_processes N -m modeling_cell2text.cli describe
...`, or torchrun), `describe` shares the cells among them and writes the same file as one process (`distributed`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cell2text_cli import build_parser

from .argument_types import as_command_line, raised_by_this_project
from .output_files import Terminated, publish_file, sigterm_as_exception

logger = logging.getLogger("cell2text")


class CLIError(Exception):
    """A problem with the command's input: reported as one line, without a traceback."""


class _CommandLineNames(logging.Filter):
    """Writes the library's warnings with this command's option names (`as_command_line`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = as_command_line(record.getMessage()), ()
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cell2text` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    existing = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.WARNING, format="cell2text: %(levelname)s: %(message)s")
    for handler in set(logging.getLogger().handlers) - existing:  # the command's own (none where one was set up)
        handler.addFilter(_CommandLineNames())
    try:
        with sigterm_as_exception():
            run(args)
    except Terminated:
        print("cell2text: stopped by SIGTERM; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("cell2text: stopped by SIGINT (Ctrl-C); nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    # bad input, or a model that overflows (FloatingPointError, naming --dtype): one line; anything else is a bug
    except (CLIError, ValueError, OSError, FloatingPointError) as error:
        if isinstance(error, ValueError) and not raised_by_this_project(error):
            raise  # another library's: where it came from is what a report of it needs
        print(f"cell2text: error: {as_command_line(' '.join(str(error).split()))}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    """Check every input first (cheap), then describe or embed the cells and write the annotated copy.

    Started as several processes (accelerate launch, torchrun), `describe` gives each process a share of the cells
    (`distributed.describe_shared`) and the main process writes the output, equal to a single process's.
    """
    import torch

    from . import distributed, tl
    from .rank_value import NotCountsError, ScaledValuesError

    check_paths(args.input, args.out, args.overwrite)
    if args.command == "describe" and args.cell_types is not None:  # before anything is loaded
        tl.DescribeOptions(constrained=False if args.free else None, cell_types=args.cell_types)
    try:  # their messages start with "device ..." / "model ..." / "key_added ...": the options' names
        device = tl.resolve_device(args.device)
        tl.check_model_path(args.model)
        tl.check_key_added(args.key_added)
    except ValueError as error:
        raise CLIError(f"--{str(error).replace('key_added', 'key-added', 1)}") from error
    state = None
    if distributed.launched_processes() > 1:
        if args.command != "describe":
            raise CLIError(f"{args.command} runs in one process: start it without accelerate launch or torchrun")
        try:
            state = distributed.process_state(device)
        except (ImportError, RuntimeError) as error:  # accelerate missing, or it joined other processes
            raise CLIError(str(error)) from error
        if args.device == "auto":
            device = state.device  # each process its own GPU
    main_process = state is None or state.is_main_process
    adata = open_h5ad(args.input)
    try:
        try:
            tl.check_key_free(adata, args.key_added, args.command)
        except ValueError as error:
            raise CLIError(str(error).replace("key_added", "--key-added")) from error
        check_counts_source(adata, args.layer, args.use_raw, has_x=h5ad_has_x(args.input))
        processor = load_processor_quietly(args.model, args.trust_remote_code)
        if args.command == "describe" and args.cell_types is not None:
            tl.with_cell_types(processor, args.cell_types)  # labels the model does not hold: before loading it
        report_genes_matched(processor.feature_extractor, adata.raw.var if args.use_raw else adata.var,
                             show=main_process)
        model, processor = tl.load(
            args.model, processor, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
        )
        common = dict(
            layer=args.layer, use_raw=args.use_raw, input_values=args.input_values, batch_size=args.batch_size,
            skip_empty_cells=args.skip_empty_cells, progress=main_process,
        )
        if args.command == "describe":
            if args.max_new_tokens is not None:
                common["max_new_tokens"] = args.max_new_tokens
            options = tl.DescribeOptions(constrained=False if args.free else None, sort_by_length=args.sort_by_length,
                                         compile=args.compile, cell_types=args.cell_types, **common)
            try:
                if state is None:
                    results, params = tl.describe_cells(adata, model, processor, options)
                else:
                    results, params = distributed.describe_shared(adata, model, processor, state, args.out, options)
            except torch.OutOfMemoryError as error:
                raise CLIError(f"out of memory describing {args.batch_size} cells at a time on {device}; pass a "
                               "smaller --batch-size") from error
            except distributed.ProcessFailed as error:  # another process's error, which that process reported
                raise CLIError(str(error)) from error
            if results is None:
                return  # the main process writes every process's results
            tl.write_descriptions(
                adata, results, args.key_added, model, processor,
                {**params, "trust_remote_code": args.trust_remote_code},
            )
            new_obs = [c for c in adata.obs.columns if c.startswith(f"{args.key_added}_")]
            write_annotated_copy(args.input, args.out, obs=adata.obs, uns={args.key_added: adata.uns[args.key_added]},
                                 overwrite=args.overwrite)
            described = int(adata.obs[f"{args.key_added}_description"].notna().sum()) if new_obs else 0
            parsed = int(adata.obs[f"{args.key_added}_parsed"].sum()) if new_obs else 0
            unparsed = (f" ({described - parsed} of them not parsed into fields: {args.key_added}_parsed is False)"
                        if parsed < described else "")
            print(f"Described {described} of {adata.n_obs} cells{unparsed}; wrote {args.out}")
        else:
            tl.embed(adata, model, key_added=args.key_added, processor=processor,
                     trust_remote_code=args.trust_remote_code, **common)
            embeddings = adata.obsm[args.key_added]
            write_annotated_copy(
                args.input, args.out, obsm={args.key_added: embeddings}, uns={args.key_added: adata.uns[args.key_added]},
                overwrite=args.overwrite,
            )
            embedded = int(np.isfinite(embeddings).all(axis=1).sum())  # a skipped cell's row is NaN
            skipped = (f" ({adata.n_obs - embedded} skipped with --skip-empty-cells: their rows are NaN)"
                       if embedded < adata.n_obs else "")
            print(f"Embedded {embedded} of {adata.n_obs} cells{skipped} ({embeddings.shape[1]} dimensions) into "
                  f"obsm[{args.key_added!r}]; wrote {args.out}")
    except (NotCountsError, ScaledValuesError) as error:  # X normalised or scaled, the counts kept elsewhere
        if args.use_raw or args.layer is not None:
            raise
        ways = ([f"The file's layers: {', '.join(adata.layers.keys())}: --layer NAME reads the one holding the "
                 "counts"] if len(adata.layers) else [])
        if adata.raw is not None:  # both where both are there: the counts may be in either
            ways.insert(0, "The file has adata.raw, where CELLxGENE files keep the counts: --use-raw reads them")
        if not ways:
            raise
        raise CLIError(f"{error}. {'. '.join(ways)}") from error
    finally:
        adata.file.close()


def check_paths(input_path: Path, out_path: Path, overwrite: bool = False) -> None:
    """Every path problem is found before any model is loaded or any cell described."""
    if input_path.is_dir():
        raise CLIError(f"input {input_path} is a folder; give the path of an .h5ad file")
    if not input_path.is_file():
        raise CLIError(f"input file {input_path} does not exist")
    same = out_path.resolve() == input_path.resolve() or (out_path.exists() and os.path.samefile(out_path, input_path))
    if same:
        raise CLIError(f"--out {out_path} is the input file; choose a new path (the input is never modified)")
    if out_path.is_dir():
        raise CLIError(f"--out {out_path} is a folder; give the path of the .h5ad file to write")
    if out_path.suffix.lower() != ".h5ad":  # out.csv was written as an HDF5 file under that name, exit 0
        raise CLIError(f"--out {out_path}: cell2text writes an .h5ad file (a copy of the input with the results in "
                       "obs or obsm), whatever the name says; name it *.h5ad (for a table, read it back: "
                       "anndata.read_h5ad(out).obs.to_csv(...))")
    if not out_path.parent.resolve().is_dir():
        raise CLIError(f"the folder of --out {out_path} does not exist")
    if not os.access(out_path.parent.resolve(), os.W_OK):
        raise CLIError(f"the folder of --out {out_path} is not writable")
    if (out_path.exists() or out_path.is_symlink()) and not overwrite:  # a dangling link too: found after describing
        raise CLIError(f"--out {out_path} exists; pass --overwrite to replace it, or choose a new path")
    needed, free = input_path.stat().st_size, shutil.disk_usage(out_path.parent.resolve()).free
    if free <= needed:  # the output is a copy of the input: found after hours of describing otherwise
        raise CLIError(f"the folder of --out {out_path} has {gigabytes(free)} free; the output, a copy of the input "
                       f"with the results added, needs more than {gigabytes(needed)}: free space there or choose "
                       "another folder")


def gigabytes(size: int) -> str:
    """A byte count for a message, in GB with two decimals (so that small test files do not read as 0)."""
    return f"{size / 1e9:.2f} GB"


def open_h5ad(path: Path) -> Any:
    """The input opened backed read-only; a file that is not a readable h5ad is an error naming it (`tl.read_h5ad`)."""
    from . import tl

    return tl.read_h5ad(path, backed="r")


def h5ad_has_x(path: Path) -> bool:
    """Whether the file stores X (anndata's backed mode fails on reading a missing X with h5py's message)."""
    import h5py

    with h5py.File(path, "r") as file:
        return "X" in file


def check_counts_source(adata: Any, layer: str | None, use_raw: bool, has_x: bool = True) -> None:
    """The matrix to read exists: the layer, adata.raw or X, with the option that reads the others."""
    layers = ", ".join(adata.layers.keys()) or "none"
    raw_hint = "; the file has adata.raw: --use-raw reads it" if adata.raw is not None else ""
    if use_raw:
        if adata.raw is None:
            raise CLIError(f"--use-raw: the file has no adata.raw; its layers: {layers} (or leave it out for X)")
    elif layer is not None:
        if layer not in adata.layers:
            raise CLIError(
                f"--layer {layer!r} is not in the file; its layers: {layers} (or leave --layer out for X){raw_hint}"
            )
    elif not has_x or adata.X is None:
        raise CLIError(f"the file has no X; pass --layer NAME naming the counts (its layers: {layers}){raw_hint}")


def load_processor_quietly(model: str, trust_remote_code: bool) -> Any:
    """`tl.load_processor` without transformers' per-file progress bars (the command shows one bar: the cells')."""
    from transformers.utils import logging as transformers_logging

    from . import tl

    transformers_logging.disable_progress_bar()  # one bar (the cells'), not one per loaded file
    return tl.load_processor(model, trust_remote_code)


def report_genes_matched(feature_extractor: Any, var: Any, show: bool = True) -> None:
    """Print (if `show`) how many of the file's genes the model knows; none at all is an error (from match_genes)."""
    from .feature_extraction_cell2text import NoGeneMatchedError

    gene_ids = feature_extractor.var_gene_ids(var)
    try:
        match = feature_extractor.match_genes(gene_ids)
    except NoGeneMatchedError as error:
        raise CLIError(
            f"none of the {len(gene_ids)} genes of the file is in the model's vocabulary (e.g. "
            f"{', '.join(map(str, gene_ids[:3]))}); var must hold Ensembl gene IDs or symbols of the model's species"
        ) from error
    if not show:
        return
    share = match.n_matched / max(match.n_input, 1)
    vocabulary = len(feature_extractor.gene_medians)  # a gene panel can match well and still cover little of it
    print(f"Genes matched: {match.n_matched} of {match.n_input} genes in the file ({share:.0%}) are in the "
          f"model's gene vocabulary; they are {match.n_matched / vocabulary:.0%} of its {vocabulary} genes")


def write_annotated_copy(
    input_path: Path,
    out_path: Path,
    *,
    obs: Any = None,
    obsm: dict[str, Any] | None = None,
    uns: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Copy the input file byte for byte, then replace the copy's obs and set obsm/uns entries.

    Only the copy is opened for writing; everything else in the file (X, layers, ...) stays as it was. The copy is
    made under a temporary name in the output's folder and published at the end (`output_files.publish_file`: an
    `out_path` that appeared meanwhile, e.g. from a second run, is replaced only with `overwrite`); any failure
    (SIGTERM and SIGINT included, see `sigterm_as_exception`) removes it, so no half-written output or stray
    temporary file is left.
    """
    import h5py
    from anndata.io import write_elem

    handle, temporary = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent.resolve())
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make --out private; give it a new file's mode
    try:
        shutil.copyfile(input_path, temporary)
        with h5py.File(temporary, "r+") as target:
            if obs is not None:
                del target["obs"]
                write_elem(target, "obs", obs)
            for group, entries in (("obsm", obsm), ("uns", uns)):
                for key, value in (entries or {}).items():
                    path = f"{group}/{key}"
                    if path in target:
                        del target[path]
                    write_elem(target, path, value)
        publish_file(Path(temporary), out_path, overwrite)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


if __name__ == "__main__":
    sys.exit(main())
