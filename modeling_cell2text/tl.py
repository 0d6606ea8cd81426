"""Scanpy-style functions: describe and embed the cells of an AnnData in place with a Cell2Text model.

    from modeling_cell2text import tl
    tl.describe(adata, "org/cell2text")   # adata.obs["cell2text_cell_type"], ..., adata.uns["cell2text"]
    tl.embed(adata, "org/cell2text")      # adata.obsm["X_cell2text"]; sc.pp.neighbors(adata, use_rep="X_cell2text")

`model` is a model folder, a Hub repo id or an already loaded model. By default the installed package's own
classes load it and no code from the model folder runs; `trust_remote_code=True` runs the folder's code instead.

This module (like the CLI) does not travel to the Hub with a saved model: no module of the model imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .argument_types import is_integer_at_least
from .cell_inputs import format_cells
from .compatibility import check_model_and_processor, gene_vocabulary_sha256, label_tables_sha256, processor_sha256
from .description_schema import ONTOLOGY_FIELDS, PATHWAY_SEPARATOR, CellDescription
from .label_scoring import constrains
from .modeling_cell2text import PICKLED_WEIGHTS, Cell2TextForConditionalGeneration, pickled_weights_message
from .package_info import DTYPE_NAMES, package_version
from .pipeline_cell2text import (
    MISSING_PROCESSOR,
    Cell2TextPipeline,
    DescribeOptions,
    cell_batches,
    check_switches,
    resolve_cells,
)
from .processing_cell2text import Cell2TextProcessor
from .schema_decoding import SCORED_FIELDS

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
PROCESSOR_FILE = "processor_config.json"
MODEL_TYPE = "cell2text"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- device, dtype, loading


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": the first CUDA GPU, else Apple MPS, else the CPU. A named device must be present here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device}: no CUDA GPU is available here (this torch build or machine); use cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device}: only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device}: Apple MPS is not available on this machine; use cpu")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device}: unsupported device type {resolved.type!r}; use cpu, cuda, cuda:N or mps")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on a CUDA GPU that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_path(model: str | os.PathLike) -> None:
    """A local folder must be a saved Cell2Text model with its processor (Hub repo ids are checked on loading)."""
    folder = Path(model)
    if not folder.exists():
        if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
            raise ValueError(f"model {model}: no such folder (nor a Hub repo id of the form owner/name)")
        _check_repo_reachable(str(model))
        return
    config_file = folder / "config.json"
    if not config_file.is_file():
        adapter = (folder / "adapter_config.json").is_file()
        raise ValueError(f"model {model}: no config.json; point it at a saved Cell2Text model folder" + (
            " (this is a PEFT adapter: load its base model, model.load_adapter(folder) or peft's "
            "PeftModel.from_pretrained(model, folder), merge it with merge_and_unload(), and pass the model with its "
            "processor)" if adapter else ""))
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"model {model}: {config_file} is not a valid JSON object ({error}); restore the file from "
                         "the model's source or save the model again") from error
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled and not any(folder.glob("*.safetensors")):
        raise ValueError(pickled_weights_message(f"model {model}", pickled[0]))
    if model_type != MODEL_TYPE:
        raise ValueError(f"model {model}: config.json says model_type {model_type!r}, not a Cell2Text model")
    if not (folder / PROCESSOR_FILE).is_file():
        raise ValueError(f"model {model}: the folder holds no processor ({PROCESSOR_FILE}). {MISSING_PROCESSOR}")


def _check_repo_reachable(repo_id: str) -> None:
    """Offline (HF_HUB_OFFLINE=1), a repo id must be in the Hugging Face cache: transformers' error named another
    file (preprocessor_config.json) and neither the cache nor offline mode."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise OSError(f"model {repo_id}: not a local folder, and not in the Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1: download it first where there is network "
                      f"(hf download {repo_id}), point at a local folder, or unset HF_HUB_OFFLINE")


def load(
    model: str | os.PathLike | torch.nn.Module,
    processor: Cell2TextProcessor | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Cell2TextProcessor]:
    """(model on its device in eval mode, processor).

    A path or repo id is loaded with this package's classes, so no code from the folder runs, unless
    `trust_remote_code=True` (then the folder's `auto_map` code is used, as in transformers). An already loaded
    model stays on its device and dtype when `device`/`dtype` are "auto", and is moved to a named device (a named
    dtype other than its own is refused: converting it would change the caller's weights); its processor is
    loaded from `model.name_or_path` unless given.
    """
    target = resolve_device(device)
    if isinstance(model, torch.nn.Module):
        if processor is None:
            source = getattr(model, "name_or_path", "")
            if not source:
                raise ValueError("the model was not loaded from a folder or repo: pass processor=...")
            processor = load_processor(source, trust_remote_code, getattr(model, "loaded_subfolder", None))
        if device != "auto":
            model = model.to(target)
        if dtype != "auto" and resolve_dtype(dtype, target) != model.dtype:
            # `.to` converts the caller's model in place: its float32 weights were lost to the next call and to
            # a later save, without a word
            raise ValueError(f"dtype={dtype!r} would convert the model you passed in place (it is {model.dtype}); "
                             f"convert it yourself (model.to(torch.bfloat16), say), or pass its folder with dtype=")
        loaded_from = getattr(model, "name_or_path", "")
        check_model_and_processor(model.config, processor, loaded_from or "the model", saved=bool(loaded_from))
        return model.eval(), processor
    check_model_path(model)
    if processor is None:
        processor = load_processor(model, trust_remote_code)
    model_class = remote_class(model, "config.json", "AutoModelForCausalLM") if trust_remote_code else None
    loaded = (model_class or Cell2TextForConditionalGeneration).from_pretrained(
        model, dtype=resolve_dtype(dtype, target)
    )
    check_model_and_processor(loaded.config, processor, str(model))
    return loaded.to(target).eval(), processor


def load_processor(model: str | os.PathLike, trust_remote_code: bool = False,
                   subfolder: str | None = None) -> Cell2TextProcessor:
    """The processor saved with a model (in its `subfolder` of a Hub repo), with this package's class unless
    `trust_remote_code=True`."""
    processor_class = remote_class(model, PROCESSOR_FILE, "AutoProcessor") if trust_remote_code else None
    where = {"subfolder": subfolder} if subfolder else {}
    return (processor_class or Cell2TextProcessor).from_pretrained(model, **where)


def remote_class(model: str | os.PathLike, config_file: str, auto_class: str) -> type:
    """The class that the model folder's own code defines for `auto_class` (its `auto_map` in `config_file`).

    This imports and runs that code: only for `trust_remote_code=True`. (transformers' Auto classes would prefer this
    package's registered classes even then, so the folder's code is looked up here.)
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.utils import cached_file

    auto_map = json.loads(Path(cached_file(str(model), config_file)).read_text()).get("auto_map", {})
    if auto_class not in auto_map:
        raise ValueError(
            f"model {model}: {config_file} names no code of its own for {auto_class} (no auto_map entry); "
            "load it without trust_remote_code"
        )
    return get_class_from_dynamic_module(auto_map[auto_class], str(model))


def model_provenance(model: torch.nn.Module) -> dict[str, str]:
    """Where the model came from: its path or repo id and a revision (the Hub commit, or the sha256 of a local
    folder's safetensors files as they are now, as evaluation's and the model card's `weights_sha256`), and
    `state_dict_sha256`, the checksum of the weights that run (in memory: a model changed after loading, or a
    folder saved again since, moves one and not the other); `subfolder` where it was loaded from one of a Hub repo."""
    source = str(getattr(model, "name_or_path", "") or "")
    revision = getattr(model.config, "_commit_hash", None)
    folder = Path(source) if source else None
    if revision is None and folder is not None and (checksum := weights_sha256(folder)) is not None:
        revision = "sha256:" + checksum
    subfolder = getattr(model, "loaded_subfolder", None)
    return {"model": source or "unsaved model", **({"subfolder": subfolder} if subfolder else {}),
            "revision": revision or "unknown", "state_dict_sha256": state_dict_sha256(model)}


def weights_sha256(model_dir: str | Path) -> str | None:
    """A checksum of a model folder's weight files (its safetensors, in name order): which weights an evaluation,
    and the card's figures, are of. None where `model_dir` is not a local folder holding weights (a Hub id)."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for weights in files:
        digest.update(weights.name.encode())
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers as they are in memory: names, dtypes, shapes and bytes, in name
    order (the same on every device)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_key_added(key_added: Any) -> None:
    """`key_added` names obs columns, an obsm entry and a uns entry: a plain, non-empty name without "/" (which h5ad
    would store as a nested group, so the uns record would not be found under the name again), and not "." or ".."
    (HDF5 path components: writing the h5ad failed after every cell was described)."""
    if (not isinstance(key_added, str) or not key_added or "/" in key_added or "\x00" in key_added
            or key_added in (".", "..")):
        raise ValueError(f"key_added {key_added!r} must be a non-empty name without '/' or NUL, not '.' or '..' "
                         "(e.g. 'cell2text')")


def check_key_free(adata: Any, key_added: str, function: str) -> None:
    """Refuse a `key_added` whose uns record is another function's (`tl.describe`'s or `tl.embed`'s): this run's
    record would replace it, leaving that run's obs columns or obsm entry without theirs. Also refuse one naming
    what no Cell2Text run wrote: a uns entry that is no Cell2Text record (`key_added="neighbors"` replaced scanpy's
    neighbours graph), or, without a record, the obsm entry (`tl.embed`) or obs columns (`tl.describe`) this run
    would write (another tool's results, replaced without a word)."""
    if not hasattr(adata, "uns"):
        return
    record = adata.uns.get(key_added)
    if record is None or not isinstance(record, Mapping) or "model" not in record:
        held = ([f"adata.uns[{key_added!r}]"] if key_added in adata.uns else []) + (
            [f"adata.obsm[{key_added!r}]"] if function == "embed" and key_added in adata.obsm else []) + (
            [f"adata.obs[{name!r}]" for name in described_columns(key_added) if name in adata.obs]
            if function == "describe" else [])
        if held:
            listed = ", ".join(held[:3]) + (f" (and {len(held) - 3} more obs columns starting with '{key_added}_')"
                                            if len(held) > 3 else "")
            raise ValueError(f"key_added {key_added!r}: {listed} "
                             f"holds results without a Cell2Text record in adata.uns[{key_added!r}] (another "
                             f"tool's, or a record dropped, as ad.concat drops uns), which this run of {function} "
                             "would replace. Pass another key_added (the defaults: 'cell2text' for describe, "
                             "'X_cell2text' for embed), or delete those entries first.")
        return
    written_by = record.get("function") or ("embed" if "pooling" in record.get("params", {}) else "describe")
    if written_by != function:
        raise ValueError(f"key_added {key_added!r}: adata.uns[{key_added!r}] records a run of {written_by}, whose "
                         f"record this run of {function} would replace. Pass another key_added (the defaults: "
                         "'cell2text' for describe, 'X_cell2text' for embed).")


def _check_writable(adata: Any, attribute: str) -> None:
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}; use the pipeline for matrices")
    if adata.is_view and adata.isbacked:
        raise ValueError(
            f"adata is a view of a backed AnnData, whose .{attribute} anndata cannot write: pass "
            "adata_view.to_memory(), or the whole backed AnnData"
        )


def _record(adata: Any, key_added: str, function: str, model: torch.nn.Module, processor: Any,
            params: dict[str, Any]) -> None:
    adata.uns[key_added] = {
        "function": function,
        **model_provenance(model),
        "gene_vocabulary_sha256": gene_vocabulary_sha256(processor.feature_extractor.gene_token_ids),
        "processor_sha256": processor_sha256(processor),
        "package_version": package_version(),
        "params": {name: value for name, value in params.items() if value is not None},
    }


# ----------------------------------------------------------------------------- describe


def describe(
    adata: Any,
    model: str | os.PathLike | torch.nn.Module,
    *,
    key_added: str = "cell2text",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    processor: Cell2TextProcessor | None = None,
    **options: Any,
) -> None:
    """Describe every cell of `adata` and write the results into `adata.obs`, in place.

    Columns, by position (so duplicated obs_names are fine): `{key_added}_description` (categorical of str; missing
    for a cell skipped with `skip_empty_cells`, "" where the model wrote nothing), `{key_added}_parsed` (bool),
    `{key_added}_<field>` for cell_type, cell_type_definition, tissue, sex, disease, age_group and pathways
    ("; "-joined; a pathway name holding "; " is refused, `check_pathways_join`) and `{key_added}_<field>_ontology_term_id`, as categoricals (missing where a field is absent or a
    cell was skipped), plus `{key_added}_<field>_score` (float) for each field the constrained decoder chose and
    `{key_added}_exact_choice` (nullable bool: every label proven the most likely of its options, `schema_results`;
    missing for a skipped cell).
    `adata.uns[key_added]` records the function ("describe"), the model (path or repo id), its revision (Hub commit
    or sha256 of the folder's weight files), `state_dict_sha256` (of the weights that ran, in memory), the processor's
    checksums (`gene_vocabulary_sha256`, `processor_sha256`), the package version and the parameters (with
    `label_tables_sha256`, of the labels as they ran; `layer` and `use_raw` as passed, so `adata.raw` is not read
    as a layer named "raw"). A key_added whose record is tl.embed's is refused (its record
    would be replaced).

    `options` are `DescribeOptions`' (`layer`, `use_raw`, `input_values`, `batch_size`, `max_new_tokens`,
    `constrained`, `skip_empty_cells`, `sort_by_length`, `compile`, `generate_kwargs`, `progress`, `cell_types`).
    Counts are read from `X`, `layers[layer]` or `adata.raw` (`use_raw=True`). A backed AnnData works (only obs
    changes, in memory: write it with `adata.write_h5ad(...)`). A view is made an actual AnnData by anndata when obs
    is written, as in scanpy (the parent is not modified); a view of a backed AnnData is refused. One description per
    cell.
    `constrained` (default: on where the processor knows the training corpus's cell-type labels) chooses every field
    among the corpus's labels (`schema_decoding.py`), with `{key_added}_<field>_score` the probability of each;
    False lets the model write the description freely (greedy; `max_new_tokens` (default: the model folder's
    generation_config.json, else 160) and `generate_kwargs` apply to free generation; a description cut there,
    before the model ended it, keeps its text with `{key_added}_parsed` False and no fields, and a warning says how
    many).
    Where obs `suspension_type` holds nuclei and the model's training corpus held none (or cells, and it held only
    nuclei: `Cell2TextConfig.training_suspension_types`), a warning says so (`warn_unseen_suspension_types`).
    """
    _check_writable(adata, "obs")
    check_key_added(key_added)
    check_key_free(adata, key_added, "describe")
    settings = DescribeOptions.from_keywords(**options)
    model, processor = load(model, processor, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    results, params = describe_cells(adata, model, processor, settings)
    write_descriptions(adata, results, key_added, model, processor,
                       {**params, "trust_remote_code": trust_remote_code})


def with_cell_types(processor: Cell2TextProcessor, cell_types: Sequence[str]) -> Cell2TextProcessor:
    """A copy of `processor` choosing the cell type among `cell_types` of its labels only (`keep_labels`; the
    caller's processor is unchanged: keep_labels replaces the tables it narrows, never edits them). Called through
    the installed class, so a processor loaded as a folder's older remote code gets it too."""
    narrowed = copy.copy(processor)
    Cell2TextProcessor.keep_labels(narrowed, cell_type=list(cell_types))
    return narrowed


def describe_cells(
    cells: Any,
    model: torch.nn.Module,
    processor: Cell2TextProcessor,
    options: DescribeOptions | None = None,
    *,
    rows: range | None = None,
    **keywords: Any,
) -> tuple[list[dict | None], dict[str, Any]]:
    """(one pipeline result per cell of `cells`, in order, None for a skipped cell; the parameters to record).

    `describe` without the writing, so that several processes can each describe a share of the cells
    (`distributed.describe_shared`: `rows`, a range of them; default all) and one writes them all. `cells` is an
    AnnData or a slice of one (backed too); `model` and `processor` are loaded (`load`); `options` (or their
    `keywords`) are `DescribeOptions`.

    `sort_by_length=True` generates the cells of each block of 512 longest first, so that a batch pads little (faster
    on cells of mixed gene counts); the results keep the cells' order. Off by default: a cell's batch neighbours
    change the padding, which in float32 changes `cell_type_score` in its last digits (about 1e-6; texts and labels
    were identical in the tests). `compile=True` decodes with a static KV cache and `torch.compile` (transformers'
    `cache_implementation="static"` and `compile_config`) on a CUDA GPU; elsewhere it has no effect and says so in
    one logged warning.
    """
    if options is None:
        options = DescribeOptions.from_keywords(**keywords)
    elif keywords:
        raise ValueError("Pass describe options either as a DescribeOptions or as keywords, not both.")
    constrained = constrains(processor, options.constrained)  # as the pipeline decides it (it warns where it differs)
    if options.cell_types is not None:
        processor = with_cell_types(processor, options.cell_types)
    check_pathways_join(processor.pathway_names, "the processor's pathway names")  # before any cell is described
    warn_unseen_suspension_types(cells, model.config, rows)
    if options.compile and constrained:
        logger.warning("compile=True applies to free describing (constrained=False): the schema-constrained decoder "
                       "runs as usual.")
    compiled = compiled_decoding_kwargs(model.device) if options.compile and not constrained else {}
    generate_kwargs = options.pipeline_generate_kwargs(constrained, compiled, model.generation_config)
    pipe = Cell2TextPipeline(model=model, processor=processor, device=model.device)
    results = pipe(
        cells, batch_size=options.batch_size, layer=options.layer, use_raw=options.use_raw,
        input_values=options.input_values, skip_empty_cells=options.skip_empty_cells,
        sort_by_length=options.sort_by_length, progress=options.progress, constrained=options.constrained, rows=rows,
        generate_kwargs=generate_kwargs,
    )
    expected = cells.n_obs if rows is None else len(rows)
    if len(results) != expected:
        raise RuntimeError(f"the pipeline returned {len(results)} results for {expected} cells")
    return results, {**options.record(model, constrained, bool(compiled), generate_kwargs),
                     "label_tables_sha256": label_tables_sha256(processor)}  # the labels that ran (a subset's own)


#: CELLxGENE's obs `suspension_type` values a training corpus counts (`Cell2TextConfig.training_suspension_types`),
#: and what the warning calls them.
_SUSPENSION_WORDS = {"nucleus": "nuclei (single-nucleus RNA-seq)", "cell": "cells"}


def warn_unseen_suspension_types(cells: Any, config: Any, rows: range | None = None) -> None:
    """Warn, once per kind, where obs `suspension_type` of `cells` (of `rows`, default all; CELLxGENE: "cell" or
    "nucleus", read in lower case as the corpus builder reads it) holds a kind the model's training corpus held none
    of (`config.training_suspension_types`): nuclei described by a model trained on cells only, or the reverse, were
    described without a word, though the model card says such descriptions are untested. Nothing where the model's
    record is unknown (None or empty) or obs has no such column."""
    trained = getattr(config, "training_suspension_types", None)
    obs = getattr(cells, "obs", None)
    if not trained or obs is None or "suspension_type" not in obs.columns:
        return
    values = obs["suspension_type"].to_numpy(dtype=object)
    values = values if rows is None else values[rows.start:rows.stop:rows.step]
    given = Counter(value.strip().lower() for value in values if isinstance(value, str))
    for kind, words in _SUSPENSION_WORDS.items():
        if given[kind] and not trained.get(kind):
            logger.warning(
                "%d of the %d cells are %s (obs suspension_type %r), but the model's training corpus held none "
                "(config.json training_suspension_types: %s): their descriptions are untested", given[kind],
                len(values), words, kind, json.dumps(trained, sort_keys=True))


def compiled_decoding_kwargs(device: torch.device) -> dict[str, Any]:
    """`generate` settings for compiled static-cache decoding on a CUDA GPU; {} (and one logged warning) elsewhere.

    transformers compiles the decoding step only on an accelerator (CUDA here): on the CPU or MPS the option has no
    effect rather than being an error, so one command line works on every machine. The static cache grows to the
    longest batch seen and is reused, so batches of other lengths do not recompile.
    """
    if device.type != "cuda":
        logger.warning(
            "compile: compiled static-cache decoding needs a CUDA GPU; the model is on %s, so decoding runs as "
            "usual (same results)", device.type,
        )
        return {}
    from transformers import CompileConfig

    return {"cache_implementation": "static", "compile_config": CompileConfig()}


def write_descriptions(
    adata: Any, results: Sequence[dict | None], key_added: str, model: torch.nn.Module, processor: Any,
    params: dict[str, Any],
) -> None:
    """Write `describe_cells`' results for all cells of `adata` into its obs and the record into its uns."""
    check_key_added(key_added)
    check_key_free(adata, key_added, "describe")
    if len(results) != adata.n_obs:
        raise ValueError(f"{len(results)} results for the {adata.n_obs} cells of adata: pass one per cell, in order")
    # A column an earlier run wrote under this key and this one does not (a free run after a constrained one has no
    # scores) would sit beside the new descriptions as if it were theirs: every column a run can write goes first.
    adata.obs.drop(columns=[name for name in described_columns(key_added) if name in adata.obs], inplace=True)
    for name, values in annotation_columns(results, key_added, constrained=bool(params.get("constrained"))).items():
        adata.obs[name] = values
    _record(adata, key_added, "describe", model, processor, params)


def described_columns(key_added: str) -> list[str]:
    """Every obs column `write_descriptions` can write under `key_added`."""
    fields = [field.name for field in dataclasses.fields(CellDescription)]
    suffixes = ["description", "parsed", "exact_choice",
                *(f"{field}{end}" for field in fields for end in ("", "_ontology_term_id", "_score"))]
    return [f"{key_added}_{suffix}" for suffix in suffixes]


def check_pathways_join(names: Sequence[str], where: str) -> None:
    """Raise `ValueError` where a pathway name holds `PATHWAY_SEPARATOR`, which joins a cell's pathways in the
    `<key>_pathways` obs column: such a name read back as two pathways. A model saved before such names were refused
    loads and describes through the pipeline (its results list each cell's pathways)."""
    holding = sorted({name for name in names if PATHWAY_SEPARATOR in name})
    if holding:
        raise ValueError(
            f"{where} {holding[:5]} hold {PATHWAY_SEPARATOR!r}, which joins a cell's pathways in one obs column: "
            f"they would read back as several pathways. Keep the other pathways (processor = "
            f"Cell2TextProcessor.from_pretrained(model); processor.keep_labels(pathways=[...]); then "
            f"tl.describe(..., processor=processor)), or describe with pipeline('cell-to-text', model=...), whose "
            f"results list each cell's pathways.")


def annotation_columns(results: Sequence[dict | None], key_added: str, constrained: bool = False) -> dict[str, Any]:
    """obs columns (one value per cell, in the cells' order) from pipeline results; None marks a skipped cell, whose
    description is missing (`isna()`), as its fields, scores and `exact_choice` are, and `parsed` False.

    With no cell described (an empty AnnData, or every cell skipped) the columns a described cell would have had are
    still written, empty or missing: those of a constrained run's results (`constrained`, with every `_score` and
    `exact_choice`) or of a free run's. A NUL character (which a model can decode, but HDF5 strings cannot hold) is
    written as U+FFFD, so one odd generation cannot make the whole h5ad unwritable; such a description does not parse
    (`parsed` is False).
    """
    import pandas as pd

    keys: list[str] = []
    for result in results:
        keys += [key for key in (result or {}) if key not in keys]
    if not keys:  # no cell described (none given, or every one skipped): the columns a reader looks for still exist
        keys = ["description", "parsed", *CellDescription().to_dict(),
                *(f"{name}_ontology_term_id" for name in ONTOLOGY_FIELDS), "cell_type_score"]
        if constrained:
            keys += ["exact_choice", *(f"{name}_score" for name in SCORED_FIELDS if name != "cell_type")]
    columns: dict[str, Any] = {}
    for key in keys:
        values = [None if result is None else result.get(key) for result in results]
        if key == "description":  # missing (not "") for a skipped cell: a model can write an empty description
            columns[f"{key_added}_{key}"] = pd.Categorical([None if v is None else v.replace("\x00", "\ufffd")
                                                             for v in values])
        elif key == "parsed":
            columns[f"{key_added}_{key}"] = np.array([bool(v) for v in values])
        elif key == "exact_choice":  # missing (not False) for a skipped cell
            columns[f"{key_added}_{key}"] = pd.array([None if v is None else bool(v) for v in values], dtype="boolean")
        elif key.endswith("_score"):
            columns[f"{key_added}_{key}"] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            if key == "pathways":  # a name written freely, outside the processor's tables
                check_pathways_join([name for v in values if v for name in v], "pathway names the model wrote")
            joined = [PATHWAY_SEPARATOR.join(v) or None if isinstance(v, list) else v for v in values]
            columns[f"{key_added}_{key}"] = pd.Categorical(joined)  # None -> missing; labels stored once
    return columns


# ----------------------------------------------------------------------------- embed


@torch.no_grad()
def embed(
    adata: Any,
    model: str | os.PathLike | torch.nn.Module,
    *,
    key_added: str = "X_cell2text",
    layer: str | None = None,
    use_raw: bool = False,
    input_values: str = "counts",
    batch_size: int = 64,
    skip_empty_cells: bool = False,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    processor: Cell2TextProcessor | None = None,
    progress: bool = True,
) -> None:
    """Per-cell embeddings from the model's gene encoder, written to `adata.obsm[key_added]`, in place.

    The embedding of a cell is the mean, over its gene positions (the `<cls>` and `<eos>` tokens and padding
    excluded), of the encoder's hidden states at layer `model.config.gene_encoder_layer`: the layer whose states the
    projector reads. Shape (n_cells, encoder hidden size), float32, rows in obs order; NaN rows for cells skipped
    with `skip_empty_cells=True`. Use it as `sc.pp.neighbors(adata, use_rep=key_added)`. NaN or infinite encoder
    states (NaN weights, float16 overflow) raise FloatingPointError naming the cells, before anything is written.
    `adata.uns[key_added]` records what `describe` records (with function "embed"); a key_added whose record is
    tl.describe's is refused.
    Views and backed AnnData behave as in `describe`.
    """
    _check_writable(adata, "obsm")
    check_key_added(key_added)
    check_key_free(adata, key_added, "embed")
    if not is_integer_at_least(batch_size, 1):
        raise ValueError(f"batch_size must be an integer >= 1 (cells encoded together), got {batch_size!r}")
    check_switches(use_raw=use_raw, skip_empty_cells=skip_empty_cells, progress=progress)
    model, processor = load(model, processor, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    feature_extractor = processor.feature_extractor
    base = getattr(model, "model", model)  # Cell2TextModel
    layer_index = model.config.gene_encoder_layer
    matrix, gene_ids, obs_names = resolve_cells(feature_extractor, adata, None, layer, use_raw)
    n_cells = matrix.shape[0]
    embeddings = np.full((n_cells, model.config.gene_encoder_config.hidden_size), np.nan, dtype=np.float32)
    with tqdm(total=n_cells, unit="cell", disable=not progress, desc="Embedding cells") as bar:
        for batch in cell_batches(feature_extractor, matrix, gene_ids, obs_names, batch_size, skip_empty_cells,
                                  {"input_values": input_values}, bar=bar):
            inputs = feature_extractor.pad(batch.tokens, batch.bins, return_tensors="pt")
            pooled = base.get_cell_embeddings(**{name: tensor.to(model.device) for name, tensor in inputs.items()})
            check_finite_embeddings(pooled, batch.rows, obs_names)
            embeddings[batch.rows] = pooled.float().cpu().numpy()
            bar.update(len(batch.rows))
    adata.obsm[key_added] = embeddings
    _record(adata, key_added, "embed", model, processor, {
        "layer": layer, "use_raw": use_raw, "input_values": input_values, "batch_size": batch_size,
        "skip_empty_cells": skip_empty_cells, "dtype": str(model.dtype), "trust_remote_code": trust_remote_code,
        "encoder_layer": int(layer_index), "pooling": "mean over gene positions",
    })


def check_finite_embeddings(pooled: torch.Tensor, rows: Sequence[int], obs_names: Sequence[str] | None) -> None:
    """Refuse NaN or infinite embeddings (NaN weights, or an encoder overflowing in float16): written to obsm, they
    read as cells skipped with skip_empty_cells, and the CLI counted them so, exit 0."""
    bad = (~torch.isfinite(pooled).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(
            f"The gene encoder returned NaN or infinite states for {len(bad)} of the {len(rows)} cells of a batch "
            f"(cells {format_cells(np.asarray(rows)[bad], obs_names)}), so they cannot be embedded. Its weights may "
            "hold NaN, or its dtype may overflow (float16): load it in float32 or bfloat16 (dtype=...)."
        )


def read_h5ad(path: str | os.PathLike, backed: str | None = None) -> Any:
    """`anndata.read_h5ad(path, backed=...)`; a file that is no readable h5ad (another format, truncated, an HDF5
    file without AnnData's groups: h5py's KeyError, anndata's TypeError) is refused naming it, as is a missing file
    (a FileNotFoundError; h5py's own read "Unable to synchronously open file (unable to open file: name = ...")."""
    import anndata as ad

    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        return ad.read_h5ad(path, backed=backed)
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read {path} as an .h5ad file (truncated, or another format?): {error}") from error


__all__ = [
    "DescribeOptions", "annotation_columns", "check_key_added", "check_key_free", "compiled_decoding_kwargs",
    "describe", "described_columns", "describe_cells", "embed", "load", "load_processor",
    "model_provenance", "package_version", "read_h5ad", "remote_class", "resolve_device", "resolve_dtype",
    "write_descriptions",
]
