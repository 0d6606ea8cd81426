"""Sharded training (FSDP2) of Cell2Text with LoRA on 2 CPU processes: the step equals one process's.

accelerate applies FSDP only on accelerator devices: with `--use_cpu true` its FSDP config runs as DDP (checked in
accelerate 1.x: `AcceleratorState` turns FSDP on for MULTI_GPU/NPU/XPU/... only, never MULTI_CPU). So on this CPU
machine the recipe under `training/configs/accelerate/fsdp.yaml` cannot be tested end to end; what the config asks
for is: its layer classes exist in the model, and torch's `fully_shard` over them (gloo, 2 processes) trains LoRA
and the projector to the same weights as one process on the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_reference import FSDP_CONFIG, lora_model, step_batch, wrapped_layer_classes
from safetensors import safe_open
from test_pipeline import save_tiny_model_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("fsdp"), trained=False)


def test_the_fsdp_config_wraps_layers_the_model_has(model_dir):
    model, _ = lora_model(str(model_dir))
    classes = {type(module).__name__ for module in model.modules()}
    assert wrapped_layer_classes(FSDP_CONFIG) <= classes  # LlamaDecoderLayer, BertLayer


def test_one_sharded_step_on_two_processes_equals_one_process(model_dir, tmp_path):
    out = tmp_path / "fsdp_step.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
         str(REPO / "tests" / "fsdp_step.py"), str(model_dir), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    model, processor = lora_model(str(model_dir))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**step_batch(processor)).loss.backward()
    optimizer.step()
    reference = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(out), "pt") as sharded:
        assert int(sharded.metadata()["wrapped_layers"]) > 0
        names = set(sharded.keys())
        assert names == set(reference), (sorted(names ^ set(reference)))[:5]
        for name in names:
            torch.testing.assert_close(sharded.get_tensor(name), reference[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(before[name], reference[name]) for name in reference)  # the step changed weights
