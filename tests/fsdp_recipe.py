"""A training recipe under accelerate's FSDP on CPU processes, for `test_fsdp.py`:

    accelerate launch --config_file <fsdp.yaml, 2 processes> tests/fsdp_recipe.py MODULE <its arguments>

MODULE: `training.sft` or `training.baselines.cell2sentence`.

accelerate (1.x) turns FSDP on only for accelerator devices: `AcceleratorState` gives CPU processes the MULTI_CPU
type (DDP) whatever the config asks. This script lifts that one rule (where an FSDP plugin was given to CPU
processes, the state becomes FSDP with that plugin) and runs `python -m MODULE` unchanged: accelerate then
shards the model with FSDP2 over gloo, saves sharded checkpoints and gathers the weights as it does on GPUs.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_accelerator_state_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                 *args, **kwargs) -> None:
    _accelerator_state_init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
