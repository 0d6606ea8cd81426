"""Rows of text token ids: which id pads them, how they are padded, the check that generated rows continue their
own prompts, and whether each ended at the end of text.

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


def token_ids(value: Any) -> set[int]:
    """Token ids as generation settings take them (None, an int, a list, nested lists, a numpy array or a tensor) as
    a set of ints: a tensor's elements hash by identity, so a suppressed end of text given as a tensor went unseen.
    A value that is no token id (a string in a malformed setting) gives none: generate's own check names its form
    (a string recursed without end here)."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple, set, frozenset)):
        return {token for item in value for token in token_ids(item)}
    return set()


def before_end_of_text(row: list[int], eos_token_id: int | None) -> list[int]:
    """A generated row's tokens (prompt removed) before its first end of text, all of them where it has none: what
    generation wrote after it (padding, or text past the end where the end of text was no stop) is no description."""
    return row[:row.index(eos_token_id)] if eos_token_id in row else row


def ended_at_end_of_text(new_tokens: Any, eos_token_id: int | None, stop_ids: Any) -> Any:
    """Per row of generated tokens (a tensor, prompt removed), whether generation stopped at the tokenizer's end of
    text, the token a description is trained to end with (`Cell2TextProcessor._target_ids`), rather than at
    max_new_tokens or at another stop id (`stop_ids`: the generation settings' eos_token_id). A row's first stop token
    decides, since rows that stopped are padded, possibly with the end-of-text id. A bool tensor on the CPU; all True
    where the tokenizer has no end-of-text token (nothing to tell by). A stop at `stop_strings` padded with the
    end-of-text id reads as ended here: the pipeline's `ends_at_a_stop_string` tells it."""
    rows = new_tokens.shape[0]
    if eos_token_id is None:
        return new_tokens.new_ones(rows).bool().cpu()
    if new_tokens.shape[1] == 0:
        return new_tokens.new_zeros(rows).bool().cpu()
    stops = {int(eos_token_id)} | token_ids(stop_ids)
    is_stop = (new_tokens[..., None] == new_tokens.new_tensor(sorted(stops))).any(dim=-1)
    first = is_stop.int().argmax(dim=1, keepdim=True)  # 0 in a row without any: is_stop.any is False there
    return (is_stop.any(dim=1) & (new_tokens.gather(1, first)[:, 0] == eos_token_id)).cpu()


__all__ = ["before_end_of_text", "check_outputs_line_up", "ended_at_end_of_text", "pad_token_rows", "text_pad_token_id",
           "token_ids"]
