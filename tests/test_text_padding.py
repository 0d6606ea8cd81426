"""The one rule for the token id that pads text (`text_padding.text_pad_token_id`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from modeling_cell2text.text_padding import text_pad_token_id


def test_pad_token_when_the_tokenizer_has_one():
    assert text_pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=7)) == 5
    assert text_pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # 0 is an id, not "missing"


def test_eos_token_when_there_is_no_pad_token():
    assert text_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7


def test_neither_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="neither a pad token nor an eos token.*tokenizer.pad_token"):
        text_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_rows_are_padded_on_the_side_asked_for_with_labels_masked():
    import pytest

    from modeling_cell2text.text_padding import pad_token_rows

    left = pad_token_rows([[5, 6, 7], [8]], pad_id=0)
    assert left == {"input_ids": [[5, 6, 7], [0, 0, 8]], "attention_mask": [[1, 1, 1], [0, 0, 1]]}
    right = pad_token_rows([[5, 6, 7], [8]], pad_id=0, padding_side="right", labels=[[-100, 6, 7], [8]])
    assert right["input_ids"] == [[5, 6, 7], [8, 0, 0]] and right["labels"] == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        pad_token_rows([[1]], 0, "middle")


def test_a_generated_row_is_read_up_to_its_first_end_of_text():
    from modeling_cell2text.text_padding import before_end_of_text

    assert before_end_of_text([5, 6, 2, 7, 2], 2) == [5, 6]  # what follows (run-on text, padding) is no description
    assert before_end_of_text([5, 6], 2) == [5, 6] and before_end_of_text([5, 6], None) == [5, 6]


def test_token_ids_reads_every_form_generation_settings_take():
    """`token_ids` sees the ids of a setting however it is given (a tensor's elements hash by identity, a set's
    are ids too), so a suppressed end of text is found in any of them; a string is no id."""
    import numpy as np
    import torch

    from modeling_cell2text.text_padding import token_ids

    assert token_ids(None) == set() and token_ids(7) == {7} and token_ids("7") == set()
    for value in ([7, [8, 9]], (7, 8, 9), {7, 8, 9}, frozenset({7, 8, 9}), torch.tensor([[7, 8], [9, 9]]),
                  np.array([7, 8, 9])):
        assert token_ids(value) == {7, 8, 9}, value
