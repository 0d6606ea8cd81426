"""benchmarks/gpu.py: skips without a GPU, and its dry run takes the GPU code path with tiny shapes on the CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tiny_parts import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_benchmark("gpu", monkeypatch).main([]) == {"skipped": "no CUDA GPU"}
    assert "skipped, no CUDA GPU" in capsys.readouterr().out


# What the GPU machine lacks: its image's packages and benchmarks/gpu_prepare.sh's wheels hold none of these (a
# top-level import of one, reached from the recipe, stopped the one GPU run after its model was written).
NOT_ON_THE_GPU_MACHINE = ("cellxgene_ontology_guide", "nltk", "rouge_score", "semantic_version", "anndata", "scanpy",
                          "gguf", "defusedxml", "tiledbsoma", "cellxgene_census")
_WITHOUT_THEM = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = ["benchmarks/gpu.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu.py", run_name="__main__")
"""


def test_dry_run_trains_and_generates_through_the_recipe_with_the_gpu_machines_packages(tmp_path):
    """The dry run in a process where the packages the GPU machine lacks cannot be imported."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", _WITHOUT_THEM.format(absent=set(NOT_ON_THE_GPU_MACHINE)),
                          "--dry-run", "--json", str(tmp_path / "figures.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["size"] == "tiny (dry run)"
    training = figures["training"]
    shapes = [(t["micro_batch"], t["accumulation"], t["checkpointing"]) for t in training]
    assert shapes == [(4, 2, True), (8, 1, False)]
    for t in training:
        assert t["cells_per_step"] == 8 and t["s_per_step"] > 0 and t["tokens_per_s"] > 0
        assert 0 < t["collator_share"] < 1
        assert len(t["losses"]) == 3 and all(math.isfinite(loss) for loss in t["losses"])
    assert [g["mode"] for g in figures["generation"]] == ["dynamic", "static", "former constrained describe",
                                                          "schema-constrained",
                                                          "schema-constrained, padded rows"]  # compiled: GPU
    assert all(g["described"] == g["batch"] == 8 and g["new_tokens_per_s"] > 0 for g in figures["generation"])
    calls = {g["mode"]: g["model_calls"] for g in figures["generation"]}
    assert calls["dynamic"] is None and calls["schema-constrained"] >= 3  # prefill, a write, a choice at least
    assert calls["schema-constrained, padded rows"] >= calls["schema-constrained"]  # packed writes: never split
    assert "s/step" in run.stdout and "cells/s" in run.stdout and "new tokens/s" in run.stdout
