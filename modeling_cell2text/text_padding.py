"""The one owner of which token id pads text: the tokenizer's pad token, else its end-of-sequence token.

Causal LMs often have no pad token; padding with EOS is safe there because padded positions are masked out.
This file travels as remote code with a saved model: it imports nothing.
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


__all__ = ["text_pad_token_id"]
