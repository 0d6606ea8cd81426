"""Saved model + processor load with trust_remote_code=True where `modeling_cell2text` cannot be imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import scipy.sparse as sp
import torch
from tiny_parts import save_tiny_parts

from modeling_cell2text import (
    Cell2TextFeatureExtractor,
    Cell2TextForConditionalGeneration,
    Cell2TextProcessor,
    save_model_folder,
)

GENES = [f"ENSG{i:011d}" for i in range(1, 61)]

# Runs in a fresh interpreter, in an empty directory, with the package made unimportable.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import numpy as np, scipy.sparse as sp, torch

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_cell2text" or name.startswith("modeling_cell2text."):
                raise ImportError("modeling_cell2text is blocked in this process")
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import modeling_cell2text  # noqa: F401
        raise SystemExit("modeling_cell2text is importable; the test would prove nothing")
    except ImportError:
        pass

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    model_dir, data_file, out_file = sys.argv[1:4]
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    assert type(AutoModel.from_pretrained(model_dir, trust_remote_code=True)).__name__ == "Cell2TextModel"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    data = np.load(data_file, allow_pickle=False)
    counts = sp.csr_matrix(data["counts"])
    inputs = processor(counts, [str(g) for g in data["genes"]])
    with torch.no_grad():
        logits = model(**inputs).logits
    np.save(out_file, logits.numpy())
    # Re-saved from the remote-code classes (the pipeline's save_pretrained, as save_model_folder does): the copy
    # must carry the code, the pipeline included.
    from pathlib import Path
    from transformers import pipeline
    resaved = str(Path(out_file).parent / "resaved")
    pipeline("cell-to-text", model=model_dir, trust_remote_code=True).save_pretrained(resaved)
    described = pipeline("cell-to-text", model=resaved, trust_remote_code=True)(counts, gene_ids=[str(g) for g in data["genes"]], max_new_tokens=3)
    assert len(described) == 3 and all("description" in d for d in described), described
    print(json.dumps({"model": type(model).__name__, "processor": type(processor).__name__,
                      "module": type(model).__module__, "config": type(config).__name__}))
    """
)


def assert_relative_imports_are_saved(model_dir) -> None:
    """Every sibling module a saved code file imports (`from .x import ...`) is saved beside it."""
    for code in model_dir.glob("*.py"):
        for module in re.findall(r"^\s*from\s+\.(\w+)\s+import", code.read_text(), flags=re.MULTILINE):
            assert (model_dir / f"{module}.py").exists(), f"{code.name} imports .{module}, which was not saved"


def test_saved_model_loads_as_remote_code_with_equal_logits(tmp_path):
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 + (i % 4) for i, g in enumerate(GENES)})
    from transformers import AutoTokenizer

    processor = Cell2TextProcessor(feature_extractor, AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16
    ).eval()
    model_dir = tmp_path / "cell2text"
    save_model_folder(model, processor, model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_cell2text.Cell2TextForConditionalGeneration"
    for code_file in ("modeling_cell2text.py", "configuration_cell2text.py", "processing_cell2text.py",
                      "feature_extraction_cell2text.py", "description_schema.py", "pipeline_cell2text.py",
                      # the feature extractor's and pipeline's parts, copied because the entry modules import them
                      "rank_value.py", "geneformer_dictionaries.py", "cell_inputs.py", "gene_ids.py", "gene_table.py",
                      "label_scoring.py", "text_padding.py"):
        assert (model_dir / code_file).exists(), code_file
    assert_relative_imports_are_saved(model_dir)

    # Cells with different numbers of expressed genes (4 to 24), raw integer counts.
    rng = np.random.default_rng(0)
    counts = np.zeros((3, len(GENES)), dtype=np.float32)
    for row, n in enumerate((4, 11, 24)):
        counts[row, rng.choice(len(GENES), n, replace=False)] = rng.integers(1, 20, n)
    data_file = tmp_path / "cells.npz"
    np.savez(data_file, counts=counts, genes=np.array(GENES))
    with torch.no_grad():
        expected = model(**processor(sp.csr_matrix(counts), GENES)).logits.numpy()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(model_dir), str(data_file), str(tmp_path / "logits.npy")],
        cwd=outside, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["model"] == "Cell2TextForConditionalGeneration"
    assert info["processor"] == "Cell2TextProcessor"
    assert info["module"].startswith("transformers_modules.")
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-5


BLOCK_PACKAGE = REMOTE_SCRIPT.split("from transformers import AutoConfig")[0]


def test_remote_pipeline_names_why_the_folders_processor_does_not_fit(tmp_path):
    """Where the package is not installed, pipeline(..., trust_remote_code=True) of a folder whose processor does not
    fit its model raised transformers' "pass trust_remote_code=True" (after an interactive prompt): the folder's
    own code loaded the processor again to name the mismatch, without the trust the user had given."""
    from test_pipeline import save_tiny_model_folder

    folder = save_tiny_model_folder(tmp_path / "model")
    config_file = folder / "processor_config.json"
    processor_config = json.loads(config_file.read_text())
    tokens = processor_config["feature_extractor"]["gene_token_ids"]
    first, second = list(tokens)[:2]
    tokens[first], tokens[second] = tokens[second], tokens[first]
    config_file.write_text(json.dumps(processor_config))
    script = BLOCK_PACKAGE + textwrap.dedent(
        """
        from transformers import pipeline
        pipeline("cell-to-text", model=sys.argv[1], trust_remote_code=True)
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=outside, env=env, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "ModelProcessorMismatchError" in result.stderr and "gene vocabulary checksum" in result.stderr, \
        result.stderr[-2000:]
