"""Schema-constrained decoding: every field of a description chosen among known labels, none written token by token.

A description follows a fixed template (`description_schema`): once its labels are chosen, its words are known. So
the decoder writes the template words and the cell type's Cell Ontology definition itself (fed to the model in one
forward pass per segment; a model trained without the definitions, `processor.definitions_in_model_text` False, is
not fed the definition, which then costs nothing) and lets the model choose only the labels, each among the labels the processor learnt from
its training corpus: the cell type, the tissue, the donor clause (sex, disease and age group), and two different
pathways. Every description parses by construction and every label has its ontology id.

One choice is decoded over a prefix tree of the options' tokens (each option tokenized as it is written after the
text before it), for all cells of a batch at once, by an exact best-first search: each step feeds, per cell, the
`num_beams` partial options of highest log-likelihood that could still beat the best complete option (each its next
branching token and the tokens that follow it without a choice) in one forward pass. The partial options of a cell
share the cell's cached prompt and see only their own ancestors (tree attention: a 4D attention mask over the tree's
tokens), so no cache is copied per option; a cell whose choice is settled sits the rest of the search out. Options
are ranked by the total log-likelihood of their tokens (as exhaustive scoring does; tokens all options share are
written, not scored). Log-probabilities are at most 0, so a partial option's log-likelihood bounds every option under
it, and the search ends when none can beat the best complete option: the choice is exhaustive scoring's argmax,
having scored a few options instead of all. A model that spreads its probability over many options is searched as a
beam search after `tree.max_depth` steps, so a choice takes at most twice its tree's depth in model calls. A small
tree (`max_tree_tokens`) is instead scored whole in one forward pass: each of its nodes is a token that sees only its
ancestors, so every option gets its exact log-likelihood. Model calls per batch: the prefill (with the words every
description starts with), one or two per choice to write the text before it (two, on padded rows only, where the
cells' texts differ so much in length that the longest cells' ends cost less in a pass of their own than as
padding), and the search's steps; none scales with the number of labels. The KV cache grows in place
(`_GrowingLayer`), not by concatenation, and a step whose cells feed different numbers of tokens runs only the real
ones, packed into one row of the language model with attention per cell (`packed_attention`), so no projection or
MLP runs on padding.

The score of a field is its chosen label's probability: its share of the softmax over the options scored and the
partial options the search left unexplored, each standing for the options under it (its log-likelihood is that of
its prefix, at least theirs). An unexplored partial option under which every option states the chosen label is left
out (its prefix would overstate the label), so that before temperature scaling the score is a lower bound of
exhaustive scoring's probability of the label, and a label every option states scores 1; each choice with its fitted
temperature (the cell type's `cell_type_temperature`, fitted on exhaustive scoring; the others'
`field_temperatures`, fitted on the options' distribution the search gives, completed and unexplored, before the
donor fields' options are summed per label). A whole tree is exhaustive scoring, distribution included.

This file travels as remote code with a saved model: it imports only torch, transformers' cache layer and attention
registry, and its sibling modules.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .description_schema import (
    ONTOLOGY_FIELDS,
    CellDescription,
    SchemaOption,
    definition_text,
    parse_or_none,
    schema_options,
    with_term_ids,
)
from .cell_inputs import CELL_INPUT_NAMES
from .label_scoring import cache_rows, left_padded_positions, shared_prefix_length

logger = logging.getLogger(__name__)

# The search's width: partial options extended per cell and step (measured on the demo model: docs/results.md).
DEFAULT_NUM_BEAMS = 2
# A choice whose tree needs at most this many tokens (its nodes with children) is scored whole, in one forward pass.
DEFAULT_MAX_TREE_TOKENS = 16
# The fields each choice states, and the result key of its score.
CHOICE_FIELDS = {
    "cell_type": ("cell_type",),
    "tissue": ("tissue",),
    "donor": ("sex", "disease", "age_group"),
    "pathway_1": ("pathway_1",),
    "pathway_2": ("pathway_2",),
}


def tokens_in_context(tokenizer, context: str, text: str) -> list[int]:
    """The tokens `text` gets when written after `context` (as in a whole description); ValueError where the
    tokenizer merges across the boundary, so that the text cannot be written as its own segment."""
    before = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    together = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if together[: len(before)] != before or len(together) == len(before):
        raise ValueError(
            f"The tokenizer joins {text!r} with the text before it ({context[-40:]!r}) into other tokens, so the "
            "description cannot be written segment by segment; use free generation (constrained=False)."
        )
    return together[len(before):]


def check_options_apart(choice: str, options: Sequence[SchemaOption], token_lists: Sequence[Sequence[int]]) -> None:
    """Refuse a choice where one option's tokens are another's, or the start of another's: the search could never
    choose the longer one (it adds log-probabilities, all negative), nor tell two equal ones apart, so a label
    would be left out of every description without a word."""
    ordered = sorted(range(len(token_lists)), key=lambda i: tuple(token_lists[i]))
    for first, second in zip(ordered, ordered[1:]):  # in sorted order, an option's extensions follow it directly
        short, long = token_lists[first], token_lists[second]
        if tuple(long[:len(short)]) == tuple(short):
            labels = [", ".join(f"{field}={label!r}" for field, label in options[i].labels) for i in (first, second)]
            raise ValueError(
                f"The {choice} options {labels[0]} and {labels[1]} are written with the same tokens"
                f"{'' if len(long) == len(short) else ' up to the end of the first'}, so the schema-constrained "
                "decoder could never choose the second: rename or remove one of the labels (processor_config.json, "
                "or the processor's attributes), or describe with constrained=False.")


class OptionTree:
    """A prefix tree over the token sequences of a choice's options. Node 0 is the root."""

    def __init__(self, token_lists: Sequence[Sequence[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.depth: list[int] = [0]
        self.ends: list[list[int]] = [[]]
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        for option, tokens in enumerate(token_lists):
            node = 0
            for token in tokens:
                nxt = self.children[node].get(token)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][token] = nxt
                    self.children.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.ends.append([])
                    self.parent.append(node)
                    self.token.append(token)
                node = nxt
            self.ends[node].append(option)
        self.max_depth = max(self.depth)
        # the nodes on each option's path (root excluded), and how many options lie under each node
        self.option_nodes: list[frozenset[int]] = []
        self.options_under = [0] * len(self.children)
        for tokens in token_lists:
            node, path = 0, []
            for token in tokens:
                node = self.children[node][token]
                path.append(node)
            self.option_nodes.append(frozenset(path))
            for node in path:
                self.options_under[node] += 1
        # For scoring the whole tree in one forward pass: the nodes whose next-token distribution is needed
        # (non-root nodes with children), each one token of the pass, in creation order (parents first).
        self.internal = [node for node in range(1, len(self.children)) if self.children[node]]

    def whole_tree_layout(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """`_whole_tree_layout`, computed once per device."""
        cached = self.__dict__.setdefault("_layouts", {})
        if device not in cached:
            cached[device] = self._whole_tree_layout(device)
        return cached[device]

    def tree_attention(self, visible: torch.Tensor) -> torch.Tensor:
        """(rows, internal nodes, cached + internal nodes): what each internal node's token may see when the whole
        tree runs after a cache whose positions `visible` (rows, cached) marks per row: those positions, its
        ancestors and itself (tree attention). Position ids: the row's next position + `depths` - 1."""
        sees = self.whole_tree_layout(visible.device)[2]
        n, count = visible.shape[0], len(self.internal)
        return torch.cat([visible[:, None, :].expand(n, count, -1), sees[None].expand(n, -1, -1)], dim=2)

    def path_log_likelihoods(self, step_log_probs: torch.Tensor) -> torch.Tensor:
        """(rows, nodes): each node's log-likelihood from the root, the sum along its path of `step_log_probs`
        (rows, nodes: each node's token log-probability after its parent; the root's entry is ignored). Float64."""
        on_path = self.whole_tree_layout(step_log_probs.device)[5]
        not_root = torch.arange(step_log_probs.shape[1], device=step_log_probs.device) > 0
        steps = torch.where(not_root, step_log_probs.double(), torch.zeros((), dtype=torch.float64,
                                                                           device=step_log_probs.device))
        return steps @ on_path.T

    def _whole_tree_layout(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(tokens of the internal nodes, their depths, which internal nodes each one sees (its ancestors and
        itself), each node's parent as a row of [the state's distribution, the internal nodes' ones], each node's
        token, and which nodes each node's path holds (to sum log-probabilities along it))."""
        slot = {node: i for i, node in enumerate(self.internal)}
        count = len(self.internal)
        sees = torch.zeros((count, count), dtype=torch.bool)
        for i, node in enumerate(self.internal):
            while node > 0:
                sees[i, slot[node]] = True
                node = self.parent[node]
        n_nodes = len(self.children)
        parent_row = torch.tensor([0] + [0 if self.parent[n] == 0 else slot[self.parent[n]] + 1
                                         for n in range(1, n_nodes)])
        on_path = torch.zeros((n_nodes, n_nodes), dtype=torch.float64)
        for node in range(1, n_nodes):
            ancestor = node
            while ancestor > 0:
                on_path[node, ancestor] = 1.0
                ancestor = self.parent[ancestor]
        return (torch.tensor([self.token[n] for n in self.internal], device=device),
                torch.tensor([self.depth[n] for n in self.internal], device=device), sees.to(device),
                parent_row.to(device), torch.tensor([max(t, 0) for t in self.token], device=device),
                on_path.to(device))


@dataclass
class _Beam:
    node: int
    log_likelihood: float
    path: tuple[int, ...] = ()  # cache positions of this partial option's tokens, in order
    log_probs: torch.Tensor | None = None  # next-token log-probabilities after its last token (None: the cell's)


@dataclass
class ChoiceResult:
    """One choice for each cell: the chosen option's index and the options the search completed (index ->
    log-likelihood), from which the scores come."""

    chosen: list[int | None]
    completed: list[dict[int, float]]
    exact: list[bool] | None = None  # per cell: the chosen option is the exact argmax (None: exhaustive scoring)
    # per cell: the partial options a search left unexplored, as (tree node, log-likelihood), each standing for the
    # options under it (None: every option was scored)
    unexplored: list[list[tuple[int, float]]] | None = None


@dataclass
class SchemaDescriptions:
    """The schema decoder's output for a batch: texts, the labels of each choice, and each field's probability."""

    texts: list[str]
    labels: list[dict[str, str | None]]
    scores: list[dict[str, float | None]] = field(default_factory=list)
    # per cell and choice: each completed option's text -> its log-likelihood; a choice of one option is not run
    # through the model (nothing to choose), so its one option reads 0.0 (probability 1 among the options)
    log_likelihoods: list[dict[str, dict[str, float]]] = field(default_factory=list)
    # per cell and choice: the partial options the search left unexplored, (tree node, log-likelihood) (`ChoiceResult`)
    unexplored: list[dict[str, list[tuple[int, float]]]] = field(default_factory=list)
    # per cell: the choices whose option is not proven the exact argmax (a search pruned a partial option that could
    # have beaten it: the model spread its probability too thinly for the search's bound)
    not_exact: list[list[str]] = field(default_factory=list)


class _KeptLogProbs:
    """Next-token log-probabilities at the (cell, position) pairs of a forward pass that were kept: `values` holds
    them in row-major order, `[row, position]` gives one (vocabulary,) row, `at(row, positions, tokens)` the
    log-probabilities of given tokens at given positions of one cell."""

    def __init__(self, values: torch.Tensor, keep: torch.Tensor):
        self.values = values
        self.index = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
        self.index[keep] = torch.arange(int(keep.sum()), device=keep.device)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return self.values[self.index[key]]

    def at(self, row: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.values[self.index[row, positions], tokens]


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of `logits` (float32), refusing NaN: a NaN log-likelihood never beats another option, so a cell
    would silently get no label and an empty description."""
    log_probs = logits.float().log_softmax(dim=-1)
    if bool(log_probs.isnan().any()):
        raise nan_logits_error("no option of the description can be scored")
    return log_probs


def nan_logits_error(consequence: str) -> FloatingPointError:
    """The one error for NaN logits, constrained (`next_token_log_probs`) or free describing (the pipeline): what
    they stop (`consequence`), their likely causes and the fix."""
    return FloatingPointError(
        f"The language model returned NaN logits, so {consequence}. Its weights may hold NaN, or its dtype may "
        "overflow (float16): load it in float32 or bfloat16 (dtype=...). A float64 model with "
        "attn_implementation='eager' gets NaN at left-padded prompt positions (transformers' eager softmax runs in "
        "float32): use 'sdpa'."
    )


def shared_prompt_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, cell_token_id: int | None) -> int:
    """How many leading prompt tokens every row of a batch shares (no padding, no cell token), leaving each row at
    least one token of its own; 0 for a single row."""
    if len(input_ids) < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)
    if cell_token_id is not None:
        same &= input_ids[0] != cell_token_id
    differs = (~same).nonzero()
    shared = int(differs[0]) if len(differs) else input_ids.shape[1]
    return min(shared, input_ids.shape[1] - 1)


@dataclass
class _Packing:
    """Where the tokens of a packed forward pass belong: token i of the pass (cells' tokens in row-major order, no
    padding) is cell `rows[i]`'s token in slot `slots[i]` of a step `width` slots wide, for `batch` cells."""

    rows: torch.Tensor
    slots: torch.Tensor
    batch: int
    width: int

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` and `slots` on `device` (a model split over devices keeps each layer on its own)."""
        return self.rows.to(device), self.slots.to(device)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, heads, tokens, dim) -> (batch, heads, width, dim), zeros where a cell has no token."""
        rows, slots = self.on(packed.device)
        padded = packed.new_zeros((self.batch, packed.shape[1], self.width, packed.shape[-1]))
        padded[rows, :, slots] = packed[0].transpose(0, 1)
        return padded

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, width, heads, dim) -> (1, tokens, heads, dim): the real tokens' rows, in order."""
        rows, slots = self.on(padded.device)
        return padded[rows, slots][None]


# The attention implementation a packed forward pass runs under (`_forward_packed` registers it): per cell, over its
# own cache. The pass sets it in the language model's config, which every thread shares: packed passes take turns
# (`_PACKED_PASS`), and a forward from another thread meanwhile gets SDPA's mask and attention under this name.
PACKED_ATTENTION = "cell2text_packed_sdpa"
_PACKED_PASS = threading.Lock()
_RUNNING = threading.local()  # `packing`: the layout of the packed pass this thread runs, None between passes


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *args,
                     cell2text_packing: _Packing | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA attention for a packed forward pass: the queries (1, heads, tokens, dim) of every cell's tokens, packed
    without padding so that the projections and the MLP run only real tokens, are laid out per cell (zeros in the
    padding slots), attend over their own cell's cache (`key`, `value`: (cells, kv heads, length, dim), as the
    `_GrowingLayer` returns them) under the 4D mask, and are packed again: (1, tokens, heads, dim)."""
    if cell2text_packing is None:
        if getattr(_RUNNING, "packing", None) is not None:
            raise RuntimeError(
                "The language model's attention layers did not pass on the schema decoder's packing layout (an "
                "architecture that does not hand its forward's keyword arguments to its attention function). Set "
                "modeling_cell2text.schema_decoding.PACK_TOKENS = False to decode with padded rows."
            )
        # a forward of this model from another thread while a packed pass holds the implementation
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    query = cell2text_packing.unpack(query)
    if query.device.type == "cpu" and kwargs.get("softcap") is None:
        # SDPA's own grouped-query attention under a mask, which transformers' SDPA path leaves out (it copies the
        # cache to every query head: measured 3-5% of a decoding step on 2 cores); the CPU kernel takes it
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"),
            enable_gqa=query.shape[1] != key.shape[1]).transpose(1, 2)
    else:  # transformers' SDPA path (its own kernel choices on a GPU; it refuses softcapping)
        output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    return cell2text_packing.pack(output), None


# Whether a decoding step runs only its real tokens (packed, `packed_attention`) where the language model attends
# with SDPA and the cache's layers grow in place; False: padded rows (`_DecodingState._forward_rows`).
PACK_TOKENS = True

# The attention implementations that take the decoder's 4D masks (tree attention: each partial option's tokens see
# only their cell's text and their own ancestors); the packed passes' own (`packed_attention`) is SDPA's.
TREE_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", PACKED_ATTENTION)


def check_tree_attention(model) -> None:
    """Refuse a language model attending with an implementation outside `TREE_ATTENTION_IMPLEMENTATIONS`: flash
    attention takes a 2D padding mask only, and with flex attention the decoder's first masked pass aborted the process
    on the CPU ("free(): invalid next size"): neither scores the options as the model reads their text."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    implementation = getattr((language_model or model).config, "_attn_implementation", None)
    if implementation is not None and implementation not in TREE_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"The language model attends with attn_implementation={implementation!r}, which does not take the "
            "schema-constrained decoder's 4D attention masks (each option's tokens may see only their cell's text and "
            "their own ancestors). Describe with SDPA (model.set_attn_implementation('sdpa'), or load the model with "
            "attn_implementation='sdpa'), or with constrained=False.")


class _GrowingLayer(DynamicLayer):
    """A KV cache layer whose keys and values are views of buffers with room to grow, so that a forward pass writes
    its new keys and values in place. `DynamicLayer` appends by concatenation, which copies the whole cache on every
    call (about 30 ms a call for a batch of 16 on the demo model, as much as running a few tokens). The buffers start
    as zeros and only ever receive keys and values, so every cached position holds finite values, also where a packed
    pass wrote nothing (masked positions must be finite: a zero attention weight times NaN is NaN)."""

    @classmethod
    def taking_over(cls, layer: DynamicLayer) -> "_GrowingLayer":
        """A growing layer holding `layer`'s keys and values (copied once, with room for as many more)."""
        grown = cls()
        grown.lazy_initialization(layer.keys, layer.values)
        grown._hold(layer.keys, layer.values, 2 * layer.keys.shape[-2])
        return grown

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New buffers of `capacity` positions starting with `keys` and `values`."""
        length = keys.shape[-2]
        self._key_buffer = keys.new_zeros((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._value_buffer = values.new_zeros((*values.shape[:-2], capacity, values.shape[-1]))
        self._key_buffer[..., :length, :] = keys
        self._value_buffer[..., :length, :] = values
        self._view(length)

    def _view(self, length: int) -> None:
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def _reserve(self, length: int) -> None:
        """Room for `length` positions (the buffers double when full)."""
        if length > self._key_buffer.shape[-2]:
            self._hold(self.keys, self.values, max(length, 2 * self._key_buffer.shape[-2]))

    packing: _Packing | None = None  # set for a packed forward pass (`_DecodingState._forward_packed`)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys and values; those of a packed pass, (1, kv heads, tokens, dim), go to their cells'
        slots (a slot with no token keeps what the buffer held there: finite, and never visible)."""
        start = self.keys.shape[-2]
        if self.packing is None:
            end = start + key_states.shape[-2]
            self._reserve(end)
            self._key_buffer[..., start:end, :] = key_states
            self._value_buffer[..., start:end, :] = value_states
        else:
            end = start + self.packing.width
            self._reserve(end)
            rows, slots = self.packing.on(self._key_buffer.device)
            self._key_buffer[rows, :, start + slots] = key_states[0].transpose(0, 1)
            self._value_buffer[rows, :, start + slots] = value_states[0].transpose(0, 1)
        self._view(end)
        return self.keys, self.values

    def append_rows(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append `keys` and `values` (len(rows), heads, width, dim) to the batch rows `rows`, and zeros to the
        others."""
        start = self.keys.shape[-2]
        end = start + keys.shape[-2]
        self._reserve(end)
        rows = rows.to(self._key_buffer.device)  # a model split over devices keeps each layer's cache on its own
        for buffer, new in ((self._key_buffer, keys), (self._value_buffer, values)):
            buffer[..., start:end, :] = 0
            buffer[rows, :, start:end, :] = new.to(buffer.device)
        self._view(end)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of tokens to remove, got {tokens_to_remove}")
        self._view(self.keys.shape[-2] - abs(tokens_to_remove))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only the batch rows `indices`, in buffers of their own (a copy: the layer this one was copied from keeps
        its buffers)."""
        indices = indices.to(self.keys.device)
        self._hold(self.keys[indices], self.values[indices], self._key_buffer.shape[-2])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._hold(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0),
                   self._key_buffer.shape[-2])


def growing_cache(cache):
    """`cache` with its plain `DynamicLayer`s replaced by `_GrowingLayer`s (in place); a cache with layers of any
    other kind is left as it is (and a search step then runs every cell)."""
    layers = getattr(cache, "layers", None) or []
    if layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        cache.layers = [_GrowingLayer.taking_over(layer) for layer in layers]
    return cache


# What one more forward pass costs, in token slots run (its fixed cost: about 40 ms for a batch of 16 on the demo
# model on 2 CPU cores, where a token slot costs about 1.2 ms). A packed write (`_packable`) never splits.
PASS_COST_IN_TOKENS = 32


def first_pass_width(lengths: Sequence[int], pass_cost: int = PASS_COST_IN_TOKENS) -> int:
    """How many tokens of each cell a write runs in its first pass: all of the longest cell's, or fewer where the
    cells longer than that, run again for their ends in a second pass, make fewer token slots in all (padding
    included, and `pass_cost` for the second pass) than one pass as wide as the longest cell."""
    widest = max(lengths, default=0)
    best, best_slots = widest, len(lengths) * widest
    for width in sorted(set(lengths)):
        if 0 < width < widest:
            slots = len(lengths) * width + sum(length > width for length in lengths) * (widest - width) + pass_cost
            if slots < best_slots:
                best, best_slots = width, slots
    return best


class _DecodingState:
    """The batch's language-model state: KV cache, which cached positions each cell's text may see, the next
    position id, and the next-token log-probabilities after the text so far."""

    def __init__(self, model, inputs: Mapping[str, torch.Tensor], opening: Sequence[int] = ()):
        """Run the prompt of each cell of `inputs`, followed by `opening`: tokens every cell's text starts with."""
        self.model = model
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if opening:
            after = torch.tensor(list(opening), dtype=input_ids.dtype, device=input_ids.device)
            after = after[None].expand(len(input_ids), -1)
            input_ids = torch.cat([input_ids, after], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(after, dtype=attention_mask.dtype)], dim=1)
        positions = left_padded_positions(attention_mask)
        cell_inputs = {k: inputs[k] for k in CELL_INPUT_NAMES if inputs.get(k) is not None}
        self.calls = 0  # model calls, and text tokens run after the prompt: what the benchmark reports
        self.tokens = len(opening) * len(input_ids)
        # The prompt's start that every cell shares (system message and the text before the cell tokens) runs once,
        # for one row, and its cache is copied to every row; the rest of the prompt runs on it.
        shared = shared_prompt_length(input_ids, attention_mask, getattr(model.config, "cell_token_id", None))
        cache = None
        if shared:
            cache = model(input_ids=input_ids[:1, :shared], position_ids=positions[:1, :shared], use_cache=True,
                          logits_to_keep=1).cache
            cache = cache_rows(cache, torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device))
            self.calls += 1
        out = model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=positions[:, shared:],
                    cache=cache, use_cache=True, logits_to_keep=1, **cell_inputs)
        self.cache = growing_cache(out.cache)
        self.visible = attention_mask.bool()
        self.next_position = attention_mask.long().sum(dim=1)
        self.log_probs = next_token_log_probs(out.logits[:, -1])
        self.calls += 1

    @property
    def device(self) -> torch.device:
        return self.visible.device

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """(cells, q, cached + q) booleans -> the 4D additive mask the model takes: 0 where allowed, the dtype's
        minimum elsewhere."""
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _forward(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        """Run `ids` (cells, q) on the cache; `allowed` (cells, q, cached + q) says what each new token sees; `real`
        marks the tokens that are not padding (counted in `tokens`). Returns the next-token log-probabilities at the
        positions `keep` marks, the only ones computed (the LM head over the vocabulary is most of the cost of a step
        on a small LM)."""
        settings = dict(input_ids=ids, attention_mask=self._additive_mask(allowed), position_ids=positions,
                        cache=self.cache, use_cache=True)
        head = self.model.get_output_embeddings()
        body = getattr(self.model, "model", None)
        if head is None or body is None:  # not a Cell2TextForConditionalGeneration: every position's logits
            kept = self.model(**settings).logits[keep]
        else:
            kept = head(body(**settings).last_hidden_state[keep])
        self.calls += 1
        self.tokens += int(real.sum())
        return _KeptLogProbs(next_token_log_probs(kept), keep)

    def _step(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
              keep: torch.Tensor) -> _KeptLogProbs:
        """A decoding step whose rows hold padding (`real` False): packed where the model allows it
        (`_forward_packed`), else the cells that have a token (`_forward_rows`)."""
        if self._packable():
            return self._forward_packed(ids, allowed, positions, real, keep)
        return self._forward_rows(ids, allowed, positions, real, keep)

    def _packable(self) -> bool:
        """Whether steps run packed: `PACK_TOKENS` is on, the cache's layers grow in place and the language model
        attends with SDPA (the implementation `packed_attention` runs per cell)."""
        layers = getattr(self.cache, "layers", None) or []
        if not PACK_TOKENS or not layers or not all(isinstance(layer, _GrowingLayer) for layer in layers):
            return False
        language_model = getattr(getattr(self.model, "model", None), "language_model", None)
        return (language_model is not None and self.model.get_output_embeddings() is not None
                and language_model.config._attn_implementation in ("sdpa", PACKED_ATTENTION))

    def _forward_packed(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                        keep: torch.Tensor) -> _KeptLogProbs:
        """`_forward` with only the real tokens run: they are packed into one row of the language model, so its
        projections and MLP (most of a step's work) skip the padding, and `packed_attention` attends per cell over
        the cell's own cache; each cell's cache grows by the step's width (new keys and values in its tokens' slots,
        the rest never visible). Same log-probabilities as `_forward`, to float rounding (a test)."""
        rows, slots = real.nonzero(as_tuple=True)
        packing = _Packing(rows, slots, ids.shape[0], ids.shape[1])
        config, layers = self.model.model.language_model.config, self.cache.layers
        # registered here, not on import: a model folder's copy of this file (remote code) registers its own
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        with _PACKED_PASS:
            implementation = config._attn_implementation
            try:
                config._attn_implementation = PACKED_ATTENTION  # this pass only: restored below
                _RUNNING.packing = packing
                for layer in layers:
                    layer.packing = packing
                hidden = self.model.model(input_ids=ids[rows, slots][None],
                                          attention_mask=self._additive_mask(allowed),
                                          position_ids=positions[rows, slots][None], cache=self.cache,
                                          use_cache=True, cell2text_packing=packing).last_hidden_state
            finally:
                config._attn_implementation = implementation
                _RUNNING.packing = None
                for layer in layers:
                    layer.packing = None
        kept = self.model.get_output_embeddings()(hidden[0, keep[rows, slots]])
        self.calls += 1
        self.tokens += len(rows)
        return _KeptLogProbs(next_token_log_probs(kept), keep & real)

    def _forward_rows(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                      keep: torch.Tensor) -> _KeptLogProbs:
        """`_forward` computed for the cells that have a token to run; the others' cache grows by the same width
        with zeros they can never see (not `visible`, and no later token of theirs is allowed to see it).

        A search step is as wide as its widest cell, and cells whose choice is settled would otherwise run a full
        row of padding (44% of the search's token slots on the demo model). The rows run are copied out of the
        cache and their new keys and values copied back; this needs the cache's `_GrowingLayer`s (`growing_cache`),
        so a cache of another layout runs every cell."""
        active = real.any(dim=1)
        layers = getattr(self.cache, "layers", None) or []
        growing = all(isinstance(layer, _GrowingLayer) for layer in layers) and len(layers) > 0
        if bool(active.all()) or not bool(active.any()) or not growing:
            return self._forward(ids, allowed, positions, real, keep)
        rows = active.nonzero().flatten()
        full_cache, width = self.cache, ids.shape[1]
        self.cache = cache_rows(full_cache, rows)
        try:
            kept = self._forward(ids[rows], allowed[rows], positions[rows], real[rows], keep[rows])
        finally:
            run_cache, self.cache = self.cache, full_cache
        for layer, run_layer in zip(full_cache.layers, run_cache.layers):
            layer.append_rows(rows, run_layer.keys[..., -width:, :], run_layer.values[..., -width:, :])
        return _KeptLogProbs(kept.values, keep & active[:, None])

    def write(self, token_lists: Sequence[Sequence[int]], pad_id: int) -> None:
        """Append each cell's tokens (lengths may differ, even 0) to its text: in one forward pass, or, on padded
        rows, in two where the lengths differ so much that a second pass for the longest cells' ends runs fewer token
        slots than one pass as wide as the longest cell (`first_pass_width`). A packed pass runs no padding but in
        attention, so it is always one (measured on the demo model: one pass 3% faster than two)."""
        lengths = [len(tokens) for tokens in token_lists]
        first = max(lengths, default=0) if self._packable() else first_pass_width(lengths, PASS_COST_IN_TOKENS)
        self._write_pass([tokens[:first] for tokens in token_lists], pad_id)
        self._write_pass([tokens[first:] for tokens in token_lists], pad_id)

    def _write_pass(self, token_lists: Sequence[Sequence[int]], pad_id: int) -> None:
        """Append each cell's tokens to its text in one forward pass of the cells that have any."""
        width = max(map(len, token_lists))
        if width == 0:
            return
        n = len(token_lists)
        ids = torch.full((n, width), pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros((n, width), dtype=torch.bool, device=self.device)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
            real[row, : len(tokens)] = True
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        new = causal[None] & real[:, None, :]
        new |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # a padding token sees itself
        allowed = torch.cat([self.visible[:, None, :].expand(n, width, -1), new], dim=2)
        positions = self.next_position[:, None] + torch.arange(width, device=self.device)
        lengths = real.sum(dim=1)
        written = lengths > 0
        last = (lengths - 1).clamp(min=0)
        keep = torch.zeros_like(real)
        keep[torch.arange(n)[written], last[written]] = True  # only the last token's distribution is read
        log_probs = self._step(ids, allowed, positions, real, keep)
        self.log_probs[written] = log_probs.values  # kept rows come in row order
        self.visible = torch.cat([self.visible, real], dim=1)
        self.next_position = self.next_position + lengths

    def score_tree(self, tree: OptionTree, excluded: Sequence[int | None]) -> ChoiceResult:
        """Every option of a small `tree` scored in one forward pass: each internal node is one token that sees its
        ancestors (tree attention), so every option's log-likelihood is exhaustive scoring's."""
        tokens, depths, _, parent_row, node_token, _ = tree.whole_tree_layout(self.device)
        n, count = len(excluded), len(tree.internal)
        if count:
            ids = tokens[None].expand(n, -1)
            allowed = tree.tree_attention(self.visible)
            positions = self.next_position[:, None] + depths[None] - 1
            real = torch.ones((n, count), dtype=torch.bool, device=self.device)
            kept = self._step(ids, allowed, positions, real, real)
            self.cache.crop(-count)  # negative: tokens to remove
        completed = []
        for row in range(n):
            rows = self.log_probs[row][None]
            if count:
                rows = torch.cat([rows, kept.values[kept.index[row]]], dim=0)
            totals = tree.path_log_likelihoods(rows[parent_row, node_token][None])[0].tolist()
            completed.append({option: totals[node] for node, options in enumerate(tree.ends) for option in options
                              if option != excluded[row]})
        picks = [max(done, key=done.get) if done else None for done in completed]
        return ChoiceResult(picks, completed)

    def _expansion_inputs(
        self, tree: OptionTree, plans: list[list[tuple]], width: int, tree_tokens: int, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
        """One `choose` step's forward inputs: per cell, each planned expansion's tokens side by side (`width`
        slots, padded), each seeing the cache, its parent's path in the tree tokens already appended
        (`tree_tokens` of them) and the tokens of its own chain before it. Returns the token ids, the attention
        (cache + tree tokens + these slots), the positions, which slots are real, and each expansion's first
        slot."""
        n = len(plans)
        ids = torch.full((n, width), pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros((n, width), dtype=torch.bool, device=self.device)
        sees_tree = torch.zeros((n, width, tree_tokens + width), dtype=torch.bool, device=self.device)
        positions = torch.zeros((n, width), dtype=torch.long, device=self.device)
        first_slots: list[list[int]] = []
        for row, row_plans in enumerate(plans):
            slot, firsts = 0, []
            for parent, tokens, nodes, _, fed in row_plans:
                firsts.append(slot)
                for k in range(fed):
                    ids[row, slot] = tokens[k]
                    real[row, slot] = True
                    positions[row, slot] = self.next_position[row] + tree.depth[nodes[k]] - 1
                    sees_tree[row, slot, list(parent.path)] = True
                    sees_tree[row, slot, tree_tokens + firsts[-1] : tree_tokens + slot + 1] = True  # its chain
                    slot += 1
            for pad in range(slot, width):
                sees_tree[row, pad, tree_tokens + pad] = True  # a padding token sees itself
            first_slots.append(firsts)
        allowed = torch.cat([self.visible[:, None, :].expand(n, width, -1), sees_tree], dim=2)
        return ids, allowed, positions, real, first_slots

    def choose(self, tree: OptionTree, width: int, excluded: Sequence[int | None], pad_id: int) -> ChoiceResult:
        """Exact best-first search of `tree` for each cell (see the module doc); the cache is left as it was.

        Each step extends, per cell, the `width` partial options of highest log-likelihood that could still beat
        the best complete option, each by one branching token and the tokens that follow it without a choice (a
        chain in the tree), all in one forward pass. Log-probabilities are at most 0, so a partial option's
        log-likelihood bounds every option under it: the search stops when no partial option can beat the best
        complete one, which is then the exact argmax. After `tree.max_depth` steps (a model that spreads its
        probability over many labels) only the `width` best partial options are kept, as in a beam search, so a
        choice never takes more than twice its tree's depth in model calls; such a cell's choice is `exact` only if
        nothing that could beat it was dropped."""
        n = len(excluded)
        start = self.cache.get_seq_length()
        completed: list[dict[int, float]] = [{} for _ in range(n)]
        frontier: list[list[tuple]] = [[] for _ in range(n)]  # heaps of (-log-likelihood, order, parent, token, child)
        dropped: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # the partial options pruned: (node, ll)
        order = itertools.count()
        tree_tokens = 0  # tree tokens appended to the cache since `start`

        def complete(row: int, node: int, ll: float) -> None:
            for option in tree.ends[node]:
                if option != excluded[row] and ll > completed[row].get(option, -float("inf")):
                    completed[row][option] = ll

        def open_children(row: int, beam: _Beam) -> None:
            children = tree.children[beam.node]
            log_probs = self.log_probs[row] if beam.log_probs is None else beam.log_probs
            values = log_probs[torch.tensor(list(children), device=self.device)].tolist()
            beam.log_probs = None  # read once: a step's tensor is not kept alive by the partial options it opened
            for (token, child), value in zip(children.items(), values):
                complete(row, child, beam.log_likelihood + value)
                only_excluded = tree.options_under[child] == 1 and excluded[row] is not None and \
                    child in tree.option_nodes[excluded[row]]
                if tree.children[child] and not only_excluded:  # a subtree holding only the excluded option: none
                    heapq.heappush(frontier[row], (-(beam.log_likelihood + value), next(order), beam, token, child))

        def best(row: int) -> float:
            return max(completed[row].values(), default=-float("inf"))

        for row in range(n):
            open_children(row, _Beam(0, 0.0))
        steps = 0
        while True:
            plans: list[list[tuple[_Beam, list[int], list[int], float, int]]] = []  # per cell, per expansion
            for row in range(n):
                row_plans, bound = [], best(row)
                while frontier[row] and len(row_plans) < width:
                    negative_ll, _, beam, token, child = heapq.heappop(frontier[row])
                    if -negative_ll <= bound:  # nothing left can beat the best complete option
                        heapq.heappush(frontier[row], (negative_ll, _, beam, token, child))  # left unexplored
                        break
                    tokens, nodes = [token], [child]
                    while not tree.ends[nodes[-1]] and len(tree.children[nodes[-1]]) == 1:
                        ((next_token, next_node),) = tree.children[nodes[-1]].items()
                        tokens.append(next_token)
                        nodes.append(next_node)
                    fed = len(tokens) if tree.children[nodes[-1]] else len(tokens) - 1  # a leaf's last: not run
                    row_plans.append((beam, tokens, nodes, -negative_ll, fed))
                plans.append(row_plans)
            width_now = max(sum(plan[4] for plan in row_plans) for row_plans in plans)
            if width_now == 0:
                break
            ids, allowed, positions, real, first_slots = self._expansion_inputs(tree, plans, width_now, tree_tokens,
                                                                                pad_id)
            log_probs = self._step(ids, allowed, positions, real, real)
            for row, row_plans in enumerate(plans):
                for (parent, tokens, nodes, ll, fed), first in zip(row_plans, first_slots[row]):
                    if len(tokens) > 1:
                        chain = log_probs.at(row, first + torch.arange(len(tokens) - 1), torch.tensor(tokens[1:]))
                        ll += float(chain.sum())
                        complete(row, nodes[-1], ll)
                    if tree.children[nodes[-1]]:
                        path = parent.path + tuple(tree_tokens + first + k for k in range(fed))
                        open_children(row, _Beam(nodes[-1], ll, path, log_probs[row, first + fed - 1]))
            tree_tokens += width_now
            steps += 1
            if steps >= tree.max_depth:  # from here on a beam search: the `width` best partial options kept
                for row in range(n):
                    ranked = sorted(frontier[row])
                    dropped[row] += [(entry[4], -entry[0]) for entry in ranked[width:]]
                    frontier[row] = ranked[:width]  # a sorted list is a heap
        if tree_tokens:
            self.cache.crop(-(self.cache.get_seq_length() - start))  # negative: tokens to remove
        picks = [max(done, key=done.get) if done else None for done in completed]
        return ChoiceResult(picks, completed, [best(row) >= max((ll for _, ll in dropped[row]), default=-float("inf"))
                                               for row in range(n)],
                            [[(entry[4], -entry[0]) for entry in frontier[row]] + dropped[row] for row in range(n)])


def known_labels(processor) -> dict[str, list[str]]:
    """Each field's labels the processor learnt from its training corpus ("pathways": the pathway names), the fields
    in the schema's order (not the saved table's)."""
    labels = {name: sorted(processor.ontology_term_ids[name]) for name in ONTOLOGY_FIELDS
              if name in processor.ontology_term_ids}
    labels["age_group"] = list(getattr(processor, "age_groups", None) or [])
    labels["pathways"] = sorted(getattr(processor, "pathway_names", None) or [])
    return labels


_MIXED = object()  # the options under a node state different labels for a field


def _labels_under(tree: OptionTree, options: Sequence[SchemaOption], fields: Sequence[str]) -> list[dict]:
    """Per node of `tree`: field -> the label every option under the node states for it, or `_MIXED`."""
    under: list[dict] = [{} for _ in tree.children]
    for option, nodes in zip(options, tree.option_nodes):
        labels = dict(option.labels)
        for node in nodes:
            for name in fields:
                value = labels.get(name)
                if name not in under[node]:
                    under[node][name] = value
                elif under[node][name] is not _MIXED and under[node][name] != value:
                    under[node][name] = _MIXED
    return under


class SchemaDecoder:
    """The options of every choice, tokenized once for a processor; `describe` decodes batches with it."""

    def __init__(self, processor, num_beams: int = DEFAULT_NUM_BEAMS, max_tree_tokens: int = DEFAULT_MAX_TREE_TOKENS):
        for name, value in (("num_beams", num_beams), ("max_tree_tokens", max_tree_tokens)):
            least = 1 if name == "num_beams" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.processor = processor
        self.num_beams = num_beams
        self.max_tree_tokens = max_tree_tokens
        self.options = schema_options(known_labels(processor))
        if "cell_type" not in self.options:
            raise ValueError(
                "The processor knows no cell-type labels (processor.ontology_term_ids['cell_type'] is empty), so the "
                "description cannot be constrained: describe with constrained=False (free generation)."
            )
        unknown = [name for name, labels in known_labels(processor).items() if not labels]
        if unknown:  # one rule for every field: stated with a known label, or left out
            logger.warning("The processor knows no labels for %s (its training corpus stated none, or keep_labels "
                           "kept none): the schema-constrained descriptions leave these fields out. Describe with "
                           "constrained=False to let the model write every field freely.", ", ".join(unknown))
        tokenizer = processor.tokenizer
        context = {"cell_type": "", "tissue": "This sample consists of a cell.", "donor": None,
                   "pathway_1": "This sample consists of a cell.", "pathway_2": 'This cell is associated with the '
                   'pathway "x".'}
        self.trees: dict[str, OptionTree] = {}
        self.option_tokens: dict[str, list[list[int]]] = {}
        self.shared_tokens: dict[str, list[int]] = {}
        for choice, options in self.options.items():
            before = context[choice]
            if before is None:  # the donor clause follows the tissue, or opens the origin sentence
                before = "This sample consists of a cell." + (" It originates from the blood of a"
                                                              if "tissue" in self.options else "")
            token_lists = [tokens_in_context(tokenizer, before, option.text) for option in options]
            check_options_apart(choice, options, token_lists)
            shared = shared_prefix_length(token_lists)  # tokens every option starts with: written, not chosen
            self.shared_tokens[choice] = token_lists[0][:shared]
            self.option_tokens[choice] = [tokens[shared:] for tokens in token_lists]
            self.trees[choice] = OptionTree(self.option_tokens[choice])
        self.labels_under = {choice: _labels_under(self.trees[choice], options, CHOICE_FIELDS[choice])
                             for choice, options in self.options.items()}
        definitions = getattr(processor, "cell_type_definitions", None) or {}
        self.definitions = {label: definitions[label] for label in self.options_labels("cell_type")
                            if definitions.get(label)}

    def options_labels(self, choice: str) -> list[str]:
        return [option.labels[0][1] for option in self.options.get(choice, [])]

    @functools.cached_property
    def longest_description_tokens(self) -> int:
        """The most tokens a description feeds the model after its prompt, give or take a token where tokenizing a
        definition after its cell type differs (the positions it needs): every choice's shared tokens and its longest
        option, and the longest definition where the model reads them. Computed once per decoder."""
        length = sum(len(self.shared_tokens[choice]) + max(map(len, self.option_tokens[choice]))
                     for choice in self.options)
        if self.processor.definitions_in_model_text and self.definitions:
            tokenizer = self.processor.tokenizer
            length += max(len(tokens_in_context(tokenizer, "This sample consists of a cell.", definition_text(text)))
                          for text in self.definitions.values())
        return length

    @torch.no_grad()
    def describe(self, model, inputs: Mapping[str, torch.Tensor]) -> SchemaDescriptions:
        """Describe each cell of `inputs` (a generation batch from the processor)."""
        from .text_padding import text_pad_token_id

        if hasattr(model, "get_base_model"):  # a PEFT model (the recipe's, during calibration): its LoRA layers are
            model = model.get_base_model()    # in place in the base model, which is called directly
        check_tree_attention(model)
        model.eval()
        tokenizer = self.processor.tokenizer
        pad_id = text_pad_token_id(tokenizer)
        first_choice = next(iter(self.options))
        state = _DecodingState(model, inputs, opening=self.shared_tokens[first_choice])  # run with the prompt
        n = inputs["input_ids"].shape[0]
        texts = [""] * n
        labels: list[dict[str, str | None]] = [{} for _ in range(n)]
        choice_results: dict[str, ChoiceResult] = {}
        pending: list[list[int]] = [[] for _ in range(n)]  # chosen tokens not yet run, written with the next prefix
        for choice, options in self.options.items():
            if choice != first_choice:
                pending = [tokens + self.shared_tokens[choice] for tokens in pending]
            excluded = choice_results["pathway_1"].chosen if choice == "pathway_2" else [None] * n
            tree = self.trees[choice]
            if len(options) == 1:  # nothing to choose (e.g. one tissue): written with the next text, probability 1
                result = ChoiceResult([None if excluded[row] == 0 else 0 for row in range(n)],
                                      [{} if excluded[row] == 0 else {0: 0.0} for row in range(n)])
            else:
                state.write(pending, pad_id)
                pending = [[] for _ in range(n)]
                if len(tree.internal) <= self.max_tree_tokens:
                    result = state.score_tree(tree, excluded)
                else:
                    result = state.choose(tree, self.num_beams, excluded, pad_id)
            choice_results[choice] = result
            for row, pick in enumerate(result.chosen):
                if pick is None:  # no option left (a single pathway name, taken by the first)
                    continue
                option: SchemaOption = options[pick]
                labels[row].update(dict(option.labels))
                text = option.text
                pending[row] = pending[row] + list(self.option_tokens[choice][pick])
                if choice == "cell_type" and labels[row]["cell_type"] in self.definitions:
                    sentence = definition_text(self.definitions[labels[row]["cell_type"]])
                    if self.processor.definitions_in_model_text:  # else the model was trained without it: not read
                        pending[row] += tokens_in_context(tokenizer, texts[row] + text, sentence)
                    text += sentence
                texts[row] += text
        self.calls, self.tokens = state.calls, state.tokens
        temperatures = {"cell_type": float(getattr(model.config, "cell_type_temperature", 1.0)),
                        **(getattr(model.config, "field_temperatures", None) or {})}
        scores, likelihoods = self._scores(choice_results, labels, temperatures)
        unexplored = [{choice: list(result.unexplored[row]) for choice, result in choice_results.items()
                       if result.unexplored is not None} for row in range(n)]
        not_exact = [[choice for choice, result in choice_results.items()
                      if result.exact is not None and not result.exact[row]] for row in range(n)]
        return SchemaDescriptions([t.strip() for t in texts], labels, scores, likelihoods, unexplored, not_exact)

    def _scores(self, results: Mapping[str, ChoiceResult], labels: list[dict], temperatures: Mapping[str, float]
                ) -> tuple[list[dict], list[dict]]:
        """Each field's probability: the chosen label's share of the softmax over the completed options and the
        partial options a search left unexplored (each standing for the options under it), summed over the options
        stating the same label, for the donor clause's three fields; an unexplored partial option under which every
        option states the chosen label is left out (a lower bound, and 1 for a label every option states: a disease
        shared by every option scored 0.567 against the whole tree's 1.0 when its mass counted against it, and a sex
        0.719 against exhaustive scoring's 0.547 when its prefix counted for it)."""
        scores = [{} for _ in labels]
        likelihoods = [{} for _ in labels]
        for choice, result in results.items():
            options = self.options[choice]
            for row, done in enumerate(result.completed):
                if not done:
                    continue
                indices = list(done)
                unexplored = result.unexplored[row] if result.unexplored is not None else []
                # each choice's temperature, fitted on validation by the recipe (1.0 where none was)
                temperature = float(temperatures.get(choice, 1.0))
                under = self.labels_under[choice]
                for name in CHOICE_FIELDS[choice]:
                    chosen = labels[row].get(name)
                    if chosen is None:  # a field without known labels, left out of the description
                        continue
                    # An unexplored partial option under which every option states the chosen label is left out of
                    # the softmax: its prefix's probability bounds those options from above, so counting it for the
                    # label would overstate it (a sex scored 0.719 where exhaustive scoring gives 0.547), and what is
                    # left (the label's completed options against every other option's bound) is a lower bound of
                    # exhaustive scoring's share; a label every option states scores 1.
                    others = [ll for node, ll in unexplored if under[node].get(name, _MIXED) != chosen]
                    values = torch.tensor([done[i] for i in indices] + others, dtype=torch.float64)
                    probabilities = (values / temperature).softmax(dim=0).tolist()
                    scores[row][name] = min(1.0, sum(p for i, p in zip(indices, probabilities)
                                                      if dict(options[i].labels).get(name) == chosen))
                likelihoods[row][choice] = {options[i].text: done[i] for i in indices}
        return scores, likelihoods


SCORED_FIELDS = ("cell_type", "tissue", "sex", "disease", "age_group", "pathways")
"""The fields whose `<field>_score` a `schema_results` result holds (pathways' is the product of its two labels')."""


def schema_results(processor, described: SchemaDescriptions) -> list[dict]:
    """Pipeline results: each description with the fields the decoder chose (taken from the choices, not read back
    from the text), their ontology ids, and `<field>_score` for every chosen field.

    `parsed` says whether the text also reads back into the same fields; it is False only where a label holds the
    template's own sentence boundaries (a cell-type label with a period followed by a space: no CL label has one;
    labels such as "NK1.1-positive ..." or "st. Louis encephalitis" read back), and the fields are the chosen ones
    either way. `exact_choice` says whether every field's label is proven the most likely
    of its options under the model; it is False only where a search over a large label set was cut to a beam
    (`SchemaDescriptions.not_exact`)."""
    definitions = getattr(processor, "cell_type_definitions", None) or {}
    results = []
    not_exact = described.not_exact or [[] for _ in described.texts]
    for text, labels, scores, unproven in zip(described.texts, described.labels, described.scores, not_exact):
        cell_type = labels.get("cell_type")
        definition = definitions.get(cell_type)
        chosen = CellDescription(
            cell_type=cell_type, cell_type_definition=definition, tissue=labels.get("tissue"),
            sex=labels.get("sex"), disease=labels.get("disease"), age_group=labels.get("age_group"),
            pathways=tuple(p for p in (labels.get("pathway_1"), labels.get("pathway_2")) if p is not None),
        )
        parsed = parse_or_none(text) == chosen
        fields = with_term_ids(chosen.to_dict(), processor.ontology_term_ids)
        result = {"description": text, "parsed": parsed, "exact_choice": not unproven, **fields}
        for name in SCORED_FIELDS:
            if name != "pathways":  # the product of its two labels', below
                result[f"{name}_score"] = scores.get(name)
        pathway_scores = [scores[k] for k in ("pathway_1", "pathway_2") if k in scores]
        result["pathways_score"] = float(torch.tensor(pathway_scores).prod()) if pathway_scores else None
        results.append(result)
    return results


__all__ = ["SCORED_FIELDS", "OptionTree", "SchemaDecoder", "SchemaDescriptions", "known_labels", "nan_logits_error",
           "schema_results", "tokens_in_context"]
