"""benchmarks/gpu.py: skips without a GPU, and its dry run takes the GPU code path with tiny shapes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _gpu_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_benchmark(monkeypatch).main([]) == {"skipped": "no CUDA GPU"}
    assert "skipped, no CUDA GPU" in capsys.readouterr().out


def test_dry_run_trains_and_generates_through_the_recipe_on_the_cpu(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    figures = _gpu_benchmark(monkeypatch).main(["--dry-run", "--json", str(tmp_path / "figures.json")])
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "figures.json").read_text())["size"] == "tiny (dry run)"
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
    from modeling_cell2text import schema_decoding
    assert schema_decoding.PACK_TOKENS is True  # restored after the padded mode
    out = capsys.readouterr().out
    assert "s/step" in out and "cells/s" in out and "new tokens/s" in out
