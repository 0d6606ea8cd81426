"""One FSDP2 training step of a tiny Cell2Text with LoRA, run by `test_fsdp.py` in 2 CPU processes (gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_step.py MODEL_DIR OUT_FILE

Each process takes its half of a fixed batch; the layers named in `training/configs/accelerate/fsdp.yaml` and the
root are sharded with `fully_shard`; after one SGD step, the main process gathers the full state dict and saves
the trainable tensors (LoRA and projector) to OUT_FILE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fsdp_reference import FSDP_CONFIG, lora_model, step_batch, wrapped_layer_classes  # noqa: E402


def main(model_dir: str, out_file: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, processor = lora_model(model_dir)
    classes = wrapped_layer_classes(FSDP_CONFIG)
    wrapped = [m for m in model.modules() if type(m).__name__ in classes]
    for module in wrapped:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = step_batch(processor, part=rank, parts=world)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        trainable = {name: tensor.contiguous() for name, tensor in state.items()
                     if "lora_" in name or ".modules_to_save." in name}
        save_file(trainable, out_file, metadata={"wrapped_layers": str(len(wrapped))})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
