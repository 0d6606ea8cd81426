"""Describe the cells of one h5ad in several processes (data parallel), for the CLI under a distributed launcher.

    accelerate launch --multi_gpu --num_processes 4 -m modeling_cell2text.cli describe in.h5ad --model M --out out.h5ad

Each process describes its contiguous share of the cells (whole blocks of the pipeline, so that the results
equal one process's) and writes them to a hidden shard file next to `--out`
(`.<out name>.shard-<run>-<rank>-of-<n>.json`, `<run>` drawn by the main process for this run, so two runs with one
`--out` never read each other's shards).
The processes then exchange whether they succeeded (a collective on all of them, so none waits for a process that
failed); the main process reads every shard in order and writes the output as a single process would, and the
shards are removed. Like the CLI, this module does not travel to the Hub with a saved model.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from . import tl
from .pipeline_cell2text import cells_per_block

INSTALL_ACCELERATE = "describing in several processes needs accelerate: pip install accelerate (or cell2text[train])"


def launched_processes() -> int:
    """How many processes the launcher started together (`WORLD_SIZE`, set by accelerate launch and torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state(device: torch.device) -> Any:
    """accelerate's `PartialState` for this process: its rank, the process count and the process group (gloo for
    the CPU, NCCL for CUDA GPUs).

    Raises RuntimeError where accelerate set up fewer processes than were launched (it does so silently, e.g. for
    processes launched for GPUs on a machine without one): every process would describe every cell.
    """
    try:
        from accelerate import PartialState
    except ImportError as error:
        raise ImportError(INSTALL_ACCELERATE) from error
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes != launched_processes():
        raise RuntimeError(
            f"{launched_processes()} processes were launched but accelerate joined {state.num_processes} for "
            f"device {device}; on a machine without a CUDA GPU pass --device cpu"
        )
    return state


def shard_bounds(n_cells: int, rank: int, world: int, unit: int = 1) -> tuple[int, int]:
    """Rows [start, stop) of process `rank` of `world`: contiguous shares in rank order, of whole `unit`s of cells
    (the last unit may be short), as even as units allow."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} processes (0 to {world - 1})")
    if unit < 1:
        raise ValueError(f"unit must be >= 1 cell, got {unit}")
    size, extra = divmod(-(-n_cells // unit), world)
    first = rank * size + min(rank, extra)
    last = first + size + (rank < extra)
    return min(first * unit, n_cells), min(last * unit, n_cells)


def shard_path(out: Path, rank: int, world: int, run: str) -> Path:
    """The hidden file holding process `rank`'s results of the run `run`, next to the output `out`."""
    return out.parent / f".{out.name}.shard-{run}-{rank}-of-{world}.json"


class ProcessFailed(RuntimeError):
    """Another process of a distributed describe failed (it reports its own error); this one stops too."""


def write_shard(path: Path, results: list[dict | None]) -> None:
    """Write results as JSON (floats round-trip exactly) under a temporary name, renamed when complete."""
    handle, temporary = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(results, file)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_shard(path: Path, n_cells: int) -> list[dict | None]:
    """One shard's results; a missing or short shard is an error (its cells would be lost or shifted)."""
    results = json.loads(path.read_text())
    if len(results) != n_cells:
        raise RuntimeError(f"shard {path} holds {len(results)} results for its {n_cells} cells")
    return results


def describe_shared(
    adata: Any,
    model: torch.nn.Module,
    processor: Any,
    state: Any,
    out: Path,
    options: Any = None,
) -> tuple[list[dict | None] | None, dict[str, Any]]:
    """Describe this process's share of `adata` (`tl.describe_cells` with `options`, a `DescribeOptions`).

    Returns (every cell's results in obs order, the parameters) in the main process and (None, the parameters) in
    the others. When any process fails, every process raises (the failed one its own error) and no shard is left.
    Shares are whole blocks of the pipeline (512 cells, or `batch_size` if larger), so every generation batch holds
    the same cells as in one process and the results are identical; fewer cells than that go to one process.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    options = options or tl.DescribeOptions()
    rank, world = state.process_index, state.num_processes
    # One id for this run's shards: another run with the same --out (its own processes, ranks and shard names
    # otherwise the same) had its main process merge this run's shard, exit 0.
    run = broadcast_object_list([uuid.uuid4().hex[:12] if state.is_main_process else None])[0]
    unit = cells_per_block(options.batch_size)
    start, stop = shard_bounds(adata.n_obs, rank, world, unit)
    paths = [shard_path(Path(out), other, world, run) for other in range(world)]
    handed_over = False  # this process's shard, once the main process is to read and remove it
    try:
        error: Exception | None = None
        params: dict[str, Any] = {}
        try:
            # rows of the whole input, not a view of it: a view of a backed file was read into memory, and errors
            # named rows counted within the share
            results, params = tl.describe_cells(adata, model, processor, options, rows=range(start, stop))
            write_shard(paths[rank], results)
        except Exception as caught:  # noqa: BLE001 (re-raised below, once the other processes know not to wait)
            error = caught
        failed = [r for r, ok in enumerate(gather_object([error is None])) if not ok]
        if failed:
            if error is not None:
                raise error
            raise ProcessFailed(f"process(es) {failed} of {world} failed (see their error); nothing was written")
        if not state.is_main_process:
            handed_over = True
            return None, params
        merged: list[dict | None] = []
        for other in range(world):
            other_start, other_stop = shard_bounds(adata.n_obs, other, world, unit)
            merged += read_shard(paths[other], other_stop - other_start)
        return merged, params
    finally:
        # Also when stopped (SIGTERM, Ctrl-C: no Exception) or when another process failed: a finished process's
        # shard was left beside the output. The main process removes every shard, the others their own.
        if state.is_main_process:
            leftovers = paths
        else:
            leftovers = [] if handed_over else [paths[rank]]
        for path in leftovers:
            path.unlink(missing_ok=True)

__all__ = [
    "ProcessFailed", "describe_shared", "launched_processes", "process_state", "read_shard", "shard_bounds", "shard_path",
    "write_shard",
]
