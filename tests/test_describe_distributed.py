"""`cell2text describe` in two CPU processes (accelerate launch): the same output file as one process, and no
output or shard left behind when a process fails."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_describe_batching import mixed_adata, save_scoring_model

from modeling_cell2text.cli import main
from modeling_cell2text.distributed import shard_bounds

# More cells than one block of the pipeline (512), so that both processes describe cells.
N_CELLS = 520
OPTIONS = ["--device", "cpu", "--max-new-tokens", "3", "--batch-size", "16", "--sort-by-length"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_scoring_model(tmp_path_factory.mktemp("distributed-model"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe_in_two_processes(model_dir: Path, cells: Path, out: Path) -> subprocess.CompletedProcess:
    """The CLI under accelerate launch: two processes joined over gloo (`--multi_gpu` starts them with torchrun;
    accelerate's `--cpu` starts one process unless MPI is set up)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    return subprocess.run(
        [*launch, "-m", "modeling_cell2text.cli", "describe", str(cells), "--model", str(model_dir),
         "--out", str(out), *OPTIONS],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_shares_are_contiguous_whole_blocks_covering_every_cell():
    for n_cells, world in ((520, 2), (2000, 3), (30, 2), (0, 2), (1024, 4)):
        bounds = [shard_bounds(n_cells, rank, world, unit=512) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n_cells
        assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(bounds))
        assert all(start % 512 == 0 or start == n_cells for start, _ in bounds)  # (empty shares at the end)
    assert [shard_bounds(2000, rank, 3, unit=512) for rank in range(3)] == [(0, 1024), (1024, 1536), (1536, 2000)]
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        shard_bounds(10, 2, 2)


def test_two_processes_write_the_same_file_as_one(model_dir, tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    mixed_adata(N_CELLS).write_h5ad(cells)
    one, two = tmp_path / "one.h5ad", tmp_path / "two.h5ad"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each launched process (OMP_NUM_THREADS=1); faster on a busy machine
    try:
        assert main(["describe", str(cells), "--model", str(model_dir), "--out", str(one), *OPTIONS]) == 0
    finally:
        torch.set_num_threads(threads)
    started = time.monotonic()
    result = describe_in_two_processes(model_dir, cells, two)
    print(f"two processes: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Described 520 of 520 cells") == 1  # the main process writes and reports
    single, shared = ad.read_h5ad(one), ad.read_h5ad(two)
    assert single.obs["cell2text_cell_type_score"].nunique() > 50  # cells are told apart, so a misplaced one shows
    pd.testing.assert_frame_equal(single.obs, shared.obs, check_exact=True)  # every column, cell and digit
    assert single.uns["cell2text"] == shared.uns["cell2text"]
    assert np.array_equal(single.X.toarray(), shared.X.toarray())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cells.h5ad", "one.h5ad", "two.h5ad"]  # no shard


def test_another_runs_shards_beside_the_same_out_are_never_read(model_dir, tmp_path):
    """The QA finding: shards were named after --out and the rank only, so of two runs with one --out the main
    process of one merged the other's shard (76 cells with another input's results), exit 0."""
    from accelerate import PartialState

    from modeling_cell2text import tl
    from modeling_cell2text.distributed import describe_shared

    out = tmp_path / "out.h5ad"
    other_runs = [tmp_path / ".out.h5ad.shard-0-of-1.json",  # the name every run used before
                  tmp_path / ".out.h5ad.shard-0123456789ab-0-of-1.json"]  # another run's now
    for other_run in other_runs:
        other_run.write_text("[]")
    adata = mixed_adata(6)
    model, processor = tl.load(model_dir, device="cpu")
    options = tl.DescribeOptions(max_new_tokens=3, batch_size=4)
    merged, _ = describe_shared(adata, model, processor, PartialState(cpu=True), out, options)
    expected, _ = tl.describe_cells(adata, model, processor, options)
    assert merged == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in other_runs)  # own removed


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_stopped_after_writing_its_shard_leaves_none(model_dir, tmp_path, monkeypatch, rank):
    """The reviewer's finding: SIGTERM or Ctrl-C (no Exception) while a process that had written its shard waited
    for the others left the shard beside --out (530 cells' results)."""
    from types import SimpleNamespace

    from modeling_cell2text import tl
    from modeling_cell2text.distributed import describe_shared

    def stopped(_):
        assert any(tmp_path.iterdir())  # this process's shard is written
        raise KeyboardInterrupt

    monkeypatch.setattr("modeling_cell2text.distributed.cells_per_block", lambda batch_size: 4)  # 2 shares of 6
    monkeypatch.setattr("accelerate.utils.broadcast_object_list", lambda objects: ["0123456789ab"])
    monkeypatch.setattr("accelerate.utils.gather_object", stopped)
    model, processor = tl.load(model_dir, device="cpu")
    state = SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0)
    with pytest.raises(KeyboardInterrupt):
        describe_shared(mixed_adata(6), model, processor, state, tmp_path / "out.h5ad",
                        tl.DescribeOptions(max_new_tokens=3, batch_size=4))
    assert list(tmp_path.iterdir()) == []


def test_a_share_of_rows_is_described_as_a_slice_and_named_by_the_input_rows(model_dir, tmp_path):
    """The reviewer's findings: a process's share was a view of the input, which anndata reads into memory for a
    backed file (the share's whole matrix), and errors counted rows within the share ("cells 3" for row 515)."""
    from modeling_cell2text import tl

    adata = mixed_adata(12)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    model, processor = tl.load(model_dir, device="cpu")
    options = tl.DescribeOptions(max_new_tokens=3, batch_size=4)
    share, _ = tl.describe_cells(backed, model, processor, options, rows=range(5, 11))
    assert share == tl.describe_cells(adata[5:11], model, processor, options)[0]
    adata.X[8] = 0
    adata.X.eliminate_zeros()
    with pytest.raises(ValueError, match=rf"1 cells express no gene of the model's vocabulary: cells 8 "
                                         rf"\('{adata.obs_names[8]}'\)"):
        tl.describe_cells(adata, model, processor, options, rows=range(5, 11))
    with pytest.raises(ValueError, match=r"rows must be a range\(start, stop\) of step 1 within the input's 12"):
        tl.describe_cells(adata, model, processor, options, rows=range(5, 13))


def test_the_progress_bar_of_a_share_names_its_cells_among_the_inputs(model_dir, capsys):
    """The main process's bar, the only one shown, ended at its share's count: 512 of 100,000 cells read as all."""
    from modeling_cell2text import tl

    adata = mixed_adata(12)
    model, processor = tl.load(model_dir, device="cpu")
    options = tl.DescribeOptions(max_new_tokens=3, batch_size=4, progress=True)
    tl.describe_cells(adata, model, processor, options, rows=range(4, 8))
    assert "Describing cells 5-8 of 12: 100%" in capsys.readouterr().err
    tl.describe_cells(adata, model, processor, options)
    assert "Describing cells: 100%" in capsys.readouterr().err


def test_a_failing_process_leaves_no_output_and_no_shard(model_dir, tmp_path):
    adata = mixed_adata(N_CELLS)
    adata.X[0] = 0  # the first process's first cell expresses no gene: it fails; the second one's share is fine
    adata.X.eliminate_zeros()
    cells = tmp_path / "cells.h5ad"
    adata.write_h5ad(cells)
    result = describe_in_two_processes(model_dir, cells, tmp_path / "out.h5ad")
    assert result.returncode != 0
    assert "1 cells express no gene of the model's vocabulary" in result.stderr  # the failed process's own error
    assert "process(es) [0] of 2 failed" in result.stderr  # the other process stops too, instead of waiting
    assert [path.name for path in tmp_path.iterdir()] == ["cells.h5ad"]


def test_embed_under_a_launcher_is_refused_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    cells = tmp_path / "cells.h5ad"
    mixed_adata(4).write_h5ad(cells)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch and torchrun set it
    monkeypatch.setattr("modeling_cell2text.tl.load", lambda *args, **kwargs: pytest.fail("must not load the model"))
    assert main(["embed", str(cells), "--model", str(model_dir), "--out", str(tmp_path / "out.h5ad")]) == 1
    assert "embed runs in one process" in capsys.readouterr().err


def test_a_short_shard_is_an_error_not_shifted_cells(tmp_path):
    from modeling_cell2text.distributed import read_shard, write_shard

    path = tmp_path / "shard.json"
    write_shard(path, [{"description": "a"}, None])
    assert read_shard(path, 2) == [{"description": "a"}, None]
    with pytest.raises(RuntimeError, match="holds 2 results for its 3 cells"):
        read_shard(path, 3)
    with pytest.raises(RuntimeError, match="holds 2 results for its 1 cells"):  # a long one shifts the next shard's
        read_shard(path, 1)
