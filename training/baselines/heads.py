"""Discrete cell-type heads on the same single-cell encoder Cell2Text reads: the paper's comparison.

- ``encoder_head``: the prepared gene encoder's own probe, a linear head trained with the encoder on the training
  cells and chosen on validation (``training.gene_encoder.probe_predictions``).
- ``projector_head``: multinomial logistic regression on what the LLM reads of a cell, the mean of its soft tokens
  (the projector's output), fitted on the training cells of the trained Cell2Text model (C by cross-validation
  on the training cells, as the expression baseline).

Both score the same cells as Cell2Text, so they enter the paired comparison of ``benchmarks/quality.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from modeling_cell2text.tl import load
from processing.corpus import split_value_lists
from training.baselines.expression import logistic_regression_baseline


@torch.no_grad()
def projector_features(model_dir: str | Path, cells, batch_size: int = 64) -> np.ndarray:
    """Per cell of `cells` (a corpus split), the mean of its soft tokens: shape (cells, LLM width), float32."""
    model, processor = load(model_dir, device="cpu", dtype="float32")
    feature_extractor = processor.feature_extractor
    tokens = [list(t) for t in cells["gene_input_ids"]]
    bins = split_value_lists(cells, feature_extractor)
    rows = []
    for start in range(0, len(tokens), batch_size):
        stop = min(start + batch_size, len(tokens))
        batch_bins = None if bins is None else [list(b) for b in bins[start:stop]]
        inputs = feature_extractor.pad(tokens[start:stop], batch_bins, return_tensors="pt")
        features, counts = model.model.get_cell_features(**inputs)
        rows += [chunk.mean(dim=0) for chunk in features.split(counts.tolist())]
    return torch.stack(rows).float().numpy()


def projector_head_predictions(model_dir: str | Path, corpus, split: str = "test") -> list[str]:
    """Logistic regression on the training cells' mean soft tokens; one predicted cell type per cell of `split`."""
    train = projector_features(model_dir, corpus["train"])
    scored = projector_features(model_dir, corpus[split])
    with threadpool_limits(limits=1, user_api="blas"):  # small products; see training.baselines.expression
        return logistic_regression_baseline(train, list(corpus["train"]["cell_type"]), scored)
