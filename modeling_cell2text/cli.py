"""`cell2text describe cells.h5ad --model PATH --out annotated.h5ad`: describe every cell of an h5ad file.

The input file is only read (opened backed, read-only); the output is a copy of it whose `obs` gains
`cell2text_description`, `cell2text_parsed` and one `cell2text_<field>` column per parsed field (plus
`cell2text_<field>_ontology_term_id`), so existing CELLxGENE columns such as `cell_type` are left as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PREFIX = "cell2text_"
DTYPES = ("float32", "bfloat16", "float16")
PROCESSOR_FILES = ("processor_config.json",)
logger = logging.getLogger("cell2text")


class CLIError(Exception):
    """A problem with the command's input: reported as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cell2text", description="Describe single cells with a Cell2Text model.")
    commands = parser.add_subparsers(dest="command", required=True)
    describe = commands.add_parser("describe", help="Write a description and parsed fields per cell into obs.")
    describe.add_argument("input", type=Path, help="input .h5ad (never modified)")
    describe.add_argument("--model", required=True, help="model folder or Hub repo (model + processor)")
    describe.add_argument("--out", required=True, type=Path, help="output .h5ad (a new file, not the input)")
    describe.add_argument("--batch-size", type=int, default=16, help="cells generated together (default 16)")
    describe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    describe.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights' dtype")
    describe.add_argument("--layer", default=None, help="AnnData layer holding the expression (default: X)")
    describe.add_argument(
        "--input-values", choices=("counts", "normalized", "log1p"), default="counts",
        help="what the expression values are (default: raw counts)",
    )
    describe.add_argument("--max-new-tokens", type=int, default=160, help="longest description in tokens")
    describe.add_argument(
        "--skip-empty-cells", action="store_true",
        help="leave cells that express none of the model's genes undescribed instead of stopping",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cell2text` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cell2text: %(levelname)s: %(message)s")
    try:
        describe_file(args)
    except (CLIError, ValueError, KeyError, OSError, RuntimeError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"cell2text: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1
    return 0


def describe_file(args: argparse.Namespace) -> None:
    """Check every input first (cheap), then describe the cells and write the annotated copy."""
    import anndata as ad

    check_paths(args.input, args.out)
    device = check_device(args.device)
    check_model_folder(args.model)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    adata = ad.read_h5ad(args.input, backed="r")
    try:
        check_layer(adata, args.layer)
        processor = load_processor(args.model)
        report_genes_matched(processor.feature_extractor, adata)  # before loading the weights: fail fast
        describe = load_pipeline(args.model, processor, device, args.dtype)
        results = describe(
            adata, batch_size=args.batch_size, layer=args.layer, input_values=args.input_values,
            skip_empty_cells=args.skip_empty_cells, max_new_tokens=args.max_new_tokens, progress=True,
        )
    finally:
        adata.file.close()
    write_annotated_copy(args.input, args.out, results)
    described = sum(r is not None for r in results)
    print(f"Described {described} of {len(results)} cells; wrote {args.out}")


def check_paths(input_path: Path, out_path: Path) -> None:
    if not input_path.is_file():
        raise CLIError(f"input file {input_path} does not exist")
    same = out_path.resolve() == input_path.resolve() or (out_path.exists() and os.path.samefile(out_path, input_path))
    if same:
        raise CLIError(f"--out {out_path} is the input file; choose a new path (the input is never modified)")
    if not out_path.parent.resolve().is_dir():
        raise CLIError(f"the folder of --out {out_path} does not exist")


def check_device(name: str) -> str:
    """The device if it is present here, else CLIError naming what is available."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from error
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"--device {name}: no CUDA GPU is available here (this torch build or machine); use cpu")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {name}: only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {name}: Apple MPS is not available on this machine; use cpu")
        return name
    raise CLIError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda, cuda:N or mps")


def check_model_folder(model: str) -> None:
    """A local model folder must hold the processor as well as the model (Hub repos are checked on loading)."""
    folder = Path(model)
    if not folder.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise CLIError(f"--model {model}: no such folder (nor a Hub repo id of the form owner/name)")
        return
    if not (folder / "config.json").is_file():
        raise CLIError(f"--model {model}: no config.json; point --model at a saved Cell2Text model folder")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise CLIError(
            f"--model {model}: the folder holds no processor (processor_config.json); save it with the model: "
            "processor.save_pretrained(model_dir)"
        )


def check_layer(adata: Any, layer: str | None) -> None:
    if layer is not None and layer not in adata.layers:
        available = ", ".join(adata.layers.keys()) or "none"
        raise CLIError(f"--layer {layer!r} is not in the file; its layers: {available} (or leave --layer out for X)")


def load_processor(model: str) -> Any:
    from transformers import AutoProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar (the cells'), not one per loaded file
    return AutoProcessor.from_pretrained(model, trust_remote_code=True)


def load_pipeline(model: str, processor: Any, device: str, dtype: str) -> Any:
    import torch
    from transformers import pipeline

    return pipeline(
        "cell-to-text", model=model, processor=processor, trust_remote_code=True, device=device,
        dtype=getattr(torch, dtype),
    )


def report_genes_matched(feature_extractor: Any, adata: Any) -> None:
    """Print how many of the file's genes the model knows; none at all is an error (raised by match_genes)."""
    gene_ids = feature_extractor.var_gene_ids(adata.var)
    try:
        match = feature_extractor.match_genes(gene_ids)
    except ValueError as error:
        if "None of the input genes" in str(error):
            raise CLIError(
                f"none of the {len(gene_ids)} genes of the file is in the model's vocabulary (e.g. "
                f"{', '.join(map(str, gene_ids[:3]))}); var must hold Ensembl gene IDs or symbols of the model's "
                "species"
            ) from error
        raise
    share = match.n_matched / max(match.n_input, 1)
    print(f"Genes matched: {match.n_matched} of {match.n_input} genes in the file ({share:.0%}) are in the "
          "model's gene vocabulary")


def annotation_columns(results: Sequence[dict | None]) -> dict[str, list]:
    """obs columns from pipeline results: strings (lists joined by '; '), None where a cell was not described."""
    keys = next((list(r) for r in results if r is not None), [])
    columns: dict[str, list] = {}
    for key in keys:
        values = []
        for result in results:
            value = None if result is None else result[key]
            if isinstance(value, list):  # pathways
                value = "; ".join(value) or None
            values.append(value)
        columns[PREFIX + key] = values
    return columns


def write_annotated_copy(input_path: Path, out_path: Path, results: Sequence[dict | None]) -> None:
    """Copy the input file byte for byte, then replace the copy's obs with obs plus the new columns.

    Only the copy is opened for writing; everything else in the file (X, layers, uns, ...) stays as it was. The copy
    is made under a temporary name and renamed at the end, so a failure never leaves a half-written output.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    with h5py.File(input_path, "r") as source:
        obs = ad.io.read_elem(source["obs"])
    if len(obs) != len(results):
        raise CLIError(f"{len(results)} results for {len(obs)} cells")
    for name, values in annotation_columns(results).items():
        if name == PREFIX + "parsed":
            obs[name] = [bool(v) for v in values]
        elif name == PREFIX + "description":
            obs[name] = ["" if v is None else v for v in values]
        else:
            obs[name] = pd.Categorical(values)  # None -> missing; repeated labels stored once
    handle, temporary = tempfile.mkstemp(suffix=".h5ad", dir=out_path.parent.resolve())
    os.close(handle)
    try:
        shutil.copyfile(input_path, temporary)
        with h5py.File(temporary, "r+") as target:
            del target["obs"]
            write_elem(target, "obs", obs)
        os.replace(temporary, out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


if __name__ == "__main__":
    sys.exit(main())
