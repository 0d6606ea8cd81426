"""The describe path the schema-constrained decoder replaced (issue 18), kept here only as the benchmarks' baseline
(`generation.py --label-scaling`, `gpu.py`): every known cell-type label scored (`label_scoring.score_cell_types`),
the best one's sentence written, the rest of the description generated freely.

Not a describe path: its texts are not checked for NaN logits or for being cut at the token limit, as the
pipeline's are. Describe cells with the `cell-to-text` pipeline, `tl.describe` or `cell2text describe`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modeling_cell2text.cell_inputs import CELL_INPUT_NAMES
from modeling_cell2text.label_scoring import cell_type_sentence, score_cell_types
from modeling_cell2text.text_padding import check_outputs_line_up, pad_token_rows, text_pad_token_id


@torch.no_grad()
def generate_with_cell_type(model, processor, inputs: Mapping[str, torch.Tensor], **generate_kwargs) -> list[str]:
    """Each cell's description: the most likely known cell-type label's sentence, then the model's own text
    (`model.generate` with `generate_kwargs`; `max_new_tokens` counts the tokens after the first sentence)."""
    scores = score_cell_types(model, processor, inputs)
    tokenizer = processor.tokenizer
    pad_id = text_pad_token_id(tokenizer)
    rows, forced = [], []
    for i, label in enumerate(scores.labels):
        prompt = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        forced.append(tokenizer(cell_type_sentence(label), add_special_tokens=False)["input_ids"])
        rows.append(prompt + forced[-1])
    device = inputs["input_ids"].device
    padded = {name: torch.tensor(value, device=device) for name, value in pad_token_rows(rows, pad_id).items()}
    cell_inputs = {name: inputs[name] for name in CELL_INPUT_NAMES if inputs.get(name) is not None}
    generate_kwargs.setdefault("pad_token_id", pad_id)
    generated = model.generate(**padded, **cell_inputs, **generate_kwargs)
    check_outputs_line_up(padded["input_ids"], generated)
    width = padded["input_ids"].shape[1]
    return [processor.reader_text(tokenizer.decode(first + generated[i, width:].tolist(), skip_special_tokens=True)
                                  .strip())
            for i, first in enumerate(forced)]
