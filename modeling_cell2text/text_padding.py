"""Rows of text token ids: which id pads them, how they are padded, and the check that generated rows continue their
own prompts.

The pad id is the tokenizer's pad token, else its end-of-sequence token: causal LMs often have no pad token, and
padding with EOS is safe there because padded positions are masked out. This file travels as remote code with a
saved model: it imports nothing.
"""

from __future__ import annotations

from typing import Any


def text_pad_token_id(tokenizer: Any) -> int:
    """The id that pads prompts and generated text: ``tokenizer.pad_token_id``, else ``tokenizer.eos_token_id``."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(
        "The tokenizer has neither a pad token nor an eos token, so text cannot be padded; set one "
        "(tokenizer.pad_token = ... or tokenizer.eos_token = ...) before building the processor."
    )


def pad_token_rows(rows: list[list[int]], pad_id: int, padding_side: str = "left",
                   labels: list[list[int]] | None = None) -> dict[str, list[list[int]]]:
    """`input_ids` and `attention_mask` (and `labels`, padded with -100) of equal width, padded on `padding_side`:
    left for generation (every row ends where its next token is written), right for training."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(row) for row in rows)

    def place(seq: list[int], fill: int) -> list[int]:
        pad = [fill] * (width - len(seq))
        return pad + seq if padding_side == "left" else seq + pad

    out = {"input_ids": [place(row, pad_id) for row in rows],
           "attention_mask": [place([1] * len(row), 0) for row in rows]}
    if labels is not None:
        out["labels"] = [place(row_labels, -100) for row_labels in labels]
    return out


def check_outputs_line_up(input_ids: Any, generated: Any) -> None:
    """The one check that generated sequences and cells line up: one sequence per cell (count), each starting with
    that cell's own prompt (order). Raises RuntimeError before a description could be given to the wrong cell."""
    n_cells, n_outputs = input_ids.shape[0], generated.shape[0]
    if n_outputs != n_cells:
        raise RuntimeError(
            f"generate returned {n_outputs} sequences for {n_cells} cells; descriptions would land on the wrong "
            "cells. Generate one sequence per cell (num_return_sequences=1)."
        )
    prompt_length = input_ids.shape[1]
    if generated.shape[1] < prompt_length or not bool(
        (generated[:, :prompt_length].to(input_ids.device) == input_ids).all()
    ):
        raise RuntimeError(
            "generated sequences do not start with their cells' prompts (count or order changed inside generate); "
            "descriptions would land on the wrong cells, so none is returned."
        )


__all__ = ["check_outputs_line_up", "pad_token_rows", "text_pad_token_id"]
