"""Schema-constrained decoding: every field of a description chosen among known labels, none written token by token.

A description follows a fixed template (`description_schema`): once its labels are chosen, its words are known. So
the decoder writes the template words and the cell type's Cell Ontology definition itself (fed to the model in one
forward pass per segment) and lets the model choose only the labels, each among the labels the processor learnt from
its training corpus: the cell type, the tissue, the donor clause (sex, disease and age group), and two different
pathways. Every description parses by construction and every label has its ontology id.

One choice is decoded over a prefix tree of the options' tokens (each option tokenized as it is written after the
text before it), for all cells of a batch at once. A small tree (`max_tree_tokens`) is scored whole in one forward
pass: each of its nodes is a token that sees only its ancestors, so every option gets its exact log-likelihood.
A larger tree is searched: each step feeds, per cell, the next branching token of each of the `num_beams` best
partial options (with the tokens that follow it without a choice) in one forward pass; the partial options of a
cell share the cell's cached prompt and see only their own ancestors (tree attention: a 4D attention mask over the
tree's tokens), so no cache is copied per option. The search ranks options by the total log-likelihood of their tokens (as exhaustive scoring
does; tokens all options share are written, not scored) and ends when every kept partial option is complete; the
best complete option is chosen. Model calls per batch: the prefill, one per choice to write the text before it,
and at most the depth of the choice's tree; none scales with the number of labels.

The score of a field is its chosen label's probability: the softmax of the log-likelihoods of the options scored
(all of a small tree's; those a search completed, the others counting as 0), so the scores of a field's labels sum
to 1; the cell type's with the model's fitted `cell_type_temperature`. A whole tree, or a search with `num_beams`
at least the number of options, is exhaustive scoring.

This file travels as remote code with a saved model: it imports only torch and its sibling modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .description_schema import (
    ONTOLOGY_FIELDS,
    CellDescription,
    SchemaOption,
    definition_text,
    parse_or_none,
    schema_options,
)
from .cell_inputs import CELL_INPUT_NAMES

DEFAULT_NUM_BEAMS = 4
# A choice whose tree needs at most this many tokens (its nodes with children) is scored whole, in one forward pass.
DEFAULT_MAX_TREE_TOKENS = 128
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
        # For scoring the whole tree in one forward pass: the nodes whose next-token distribution is needed
        # (non-root nodes with children), each one token of the pass, in creation order (parents first).
        self.internal = [node for node in range(1, len(self.children)) if self.children[node]]

    def whole_tree_layout(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """`_whole_tree_layout`, computed once per device."""
        cached = self.__dict__.setdefault("_layouts", {})
        if device not in cached:
            cached[device] = self._whole_tree_layout(device)
        return cached[device]

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


@dataclass
class SchemaDescriptions:
    """The schema decoder's output for a batch: texts, the labels of each choice, and each field's probability."""

    texts: list[str]
    labels: list[dict[str, str | None]]
    scores: list[dict[str, float | None]] = field(default_factory=list)
    log_likelihoods: list[dict[str, dict[str, float]]] = field(default_factory=list)


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


class _DecodingState:
    """The batch's language-model state: KV cache, which cached positions each cell's text may see, the next
    position id, and the next-token log-probabilities after the text so far."""

    def __init__(self, model, inputs: Mapping[str, torch.Tensor]):
        self.model = model
        attention_mask = inputs["attention_mask"]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cell_inputs = {k: inputs[k] for k in CELL_INPUT_NAMES if inputs.get(k) is not None}
        out = model(input_ids=inputs["input_ids"], attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **cell_inputs)
        self.cache = out.cache
        self.visible = attention_mask.bool()
        self.next_position = attention_mask.long().sum(dim=1)
        self.log_probs = out.logits[:, -1].float().log_softmax(dim=-1)
        self.calls = 1  # model calls, and text tokens run after the prompt: what the benchmark reports
        self.tokens = 0

    @property
    def device(self) -> torch.device:
        return self.visible.device

    def _forward(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        """Run `ids` (cells, q) on the cache; `allowed` (cells, q, cached + q) says what each new token sees; `real`
        marks the tokens that are not padding (counted in `tokens`). Returns the next-token log-probabilities at the
        positions `keep` marks, the only ones computed (the LM head over the vocabulary is most of the cost of a step
        on a small LM)."""
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        settings = dict(input_ids=ids, attention_mask=mask[:, None], position_ids=positions, cache=self.cache,
                        use_cache=True)
        head = self.model.get_output_embeddings()
        body = getattr(self.model, "model", None)
        if head is None or body is None:  # not a Cell2TextForConditionalGeneration: every position's logits
            kept = self.model(**settings).logits[keep]
        else:
            kept = head(body(**settings).last_hidden_state[keep])
        self.calls += 1
        self.tokens += int(real.sum())
        return _KeptLogProbs(kept.float().log_softmax(dim=-1), keep)

    def write(self, token_lists: Sequence[Sequence[int]], pad_id: int) -> None:
        """Append each cell's tokens (lengths may differ, even 0) to its text, in one forward pass."""
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
        log_probs = self._forward(ids, allowed, positions, real, keep)
        self.log_probs[written] = log_probs.values  # kept rows come in row order
        self.visible = torch.cat([self.visible, real], dim=1)
        self.next_position = self.next_position + lengths

    def score_tree(self, tree: OptionTree, excluded: Sequence[int | None]) -> ChoiceResult:
        """Every option of a small `tree` scored in one forward pass: each internal node is one token that sees its
        ancestors (tree attention), so every option's log-likelihood is exhaustive scoring's."""
        tokens, depths, sees, parent_row, node_token, on_path = tree.whole_tree_layout(self.device)
        n, count = len(excluded), len(tree.internal)
        if count:
            ids = tokens[None].expand(n, -1)
            allowed = torch.cat([self.visible[:, None, :].expand(n, count, -1), sees[None].expand(n, -1, -1)], dim=2)
            positions = self.next_position[:, None] + depths[None] - 1
            real = torch.ones((n, count), dtype=torch.bool, device=self.device)
            kept = self._forward(ids, allowed, positions, real, real)
            self.cache.crop(-count)  # negative: tokens to remove
        completed = []
        for row in range(n):
            rows = self.log_probs[row][None]
            if count:
                rows = torch.cat([rows, kept.values[kept.index[row]]], dim=0)
            node_log_probs = rows[parent_row, node_token].double()
            node_log_probs[0] = 0.0
            totals = (on_path @ node_log_probs).tolist()
            completed.append({option: totals[node] for node, options in enumerate(tree.ends) for option in options
                              if option != excluded[row]})
        picks = [max(done, key=done.get) if done else None for done in completed]
        return ChoiceResult(picks, completed)

    def choose(self, tree: OptionTree, num_beams: int, excluded: Sequence[int | None], pad_id: int) -> ChoiceResult:
        """Search `tree` for each cell (see the module doc); the cache is left as it was.

        Each step extends the `num_beams` best partial options of every cell by one branching token, plus the tokens
        that follow it without a choice (a chain in the tree), all in one forward pass."""
        n = len(excluded)
        start = self.cache.get_seq_length()
        beams: list[list[_Beam]] = [[_Beam(0, 0.0)] for _ in range(n)]
        completed: list[dict[int, float]] = [{} for _ in range(n)]
        tree_tokens = 0  # tree tokens appended to the cache since `start`

        def complete(row: int, node: int, ll: float) -> None:
            for option in tree.ends[node]:
                if option != excluded[row] and ll > completed[row].get(option, -float("inf")):
                    completed[row][option] = ll

        while True:
            plans: list[list[tuple[_Beam, list[int], list[int], float, int]]] = []  # per cell, per kept expansion
            for row in range(n):
                expansions = []
                for beam in beams[row]:
                    children = tree.children[beam.node]
                    if not children:
                        continue
                    log_probs = self.log_probs[row] if beam.log_probs is None else beam.log_probs
                    values = log_probs[torch.tensor(list(children), device=self.device)].tolist()
                    for (token, child), value in zip(children.items(), values):
                        complete(row, child, beam.log_likelihood + value)
                        if tree.children[child]:
                            expansions.append((beam, token, child, beam.log_likelihood + value))
                expansions.sort(key=lambda e: -e[3])
                row_plans = []
                for beam, token, child, ll in expansions[:num_beams]:
                    tokens, nodes = [token], [child]
                    while not tree.ends[nodes[-1]] and len(tree.children[nodes[-1]]) == 1:
                        ((next_token, next_node),) = tree.children[nodes[-1]].items()
                        tokens.append(next_token)
                        nodes.append(next_node)
                    fed = len(tokens) if tree.children[nodes[-1]] else len(tokens) - 1  # a leaf's last: not run
                    row_plans.append((beam, tokens, nodes, ll, fed))
                plans.append(row_plans)
            width = max(sum(plan[4] for plan in row_plans) for row_plans in plans)
            if width == 0:
                break
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
            log_probs = self._forward(ids, allowed, positions, real, real)
            beams = [[] for _ in range(n)]
            for row, row_plans in enumerate(plans):
                for (parent, tokens, nodes, ll, fed), first in zip(row_plans, first_slots[row]):
                    if len(tokens) > 1:
                        chain = log_probs.at(row, first + torch.arange(len(tokens) - 1), torch.tensor(tokens[1:]))
                        ll += float(chain.sum())
                        complete(row, nodes[-1], ll)
                    if tree.children[nodes[-1]]:
                        path = parent.path + tuple(tree_tokens + first + k for k in range(fed))
                        beams[row].append(_Beam(nodes[-1], ll, path, log_probs[row, first + fed - 1]))
            tree_tokens += width
        if tree_tokens:
            self.cache.crop(-(self.cache.get_seq_length() - start))  # negative: tokens to remove
        picks = [max(done, key=done.get) if done else None for done in completed]
        return ChoiceResult(picks, completed)


def known_labels(processor) -> dict[str, list[str]]:
    """Each field's labels the processor learnt from its training corpus ("pathways": the pathway names)."""
    labels = {name: sorted(values) for name, values in processor.ontology_term_ids.items()}
    labels["age_group"] = list(getattr(processor, "age_groups", None) or [])
    labels["pathways"] = sorted(getattr(processor, "pathway_names", None) or [])
    return labels


class SchemaDecoder:
    """The options of every choice, tokenized once for a processor; `describe` decodes batches with it."""

    def __init__(self, processor, num_beams: int = DEFAULT_NUM_BEAMS, max_tree_tokens: int = DEFAULT_MAX_TREE_TOKENS):
        for name, value in (("num_beams", num_beams), ("max_tree_tokens", max_tree_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "num_beams" else 0):
                raise ValueError(f"{name} must be a non-negative integer (num_beams >= 1), got {value!r}")
        self.processor = processor
        self.num_beams = num_beams
        self.max_tree_tokens = max_tree_tokens
        self.options = schema_options(known_labels(processor))
        if "cell_type" not in self.options:
            raise ValueError(
                "The processor knows no cell-type labels (processor.ontology_term_ids['cell_type'] is empty), so the "
                "description cannot be constrained: describe with constrained=False (free generation)."
            )
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
                before = "This sample consists of a cell." + (" It originates from the blood of"
                                                              if "tissue" in self.options else "")
            token_lists = [tokens_in_context(tokenizer, before, option.text) for option in options]
            shared = 0  # tokens every option starts with, leaving each at least one of its own: written, not chosen
            while shared < min(map(len, token_lists)) - 1 and len({t[shared] for t in token_lists}) == 1:
                shared += 1
            self.shared_tokens[choice] = token_lists[0][:shared]
            self.option_tokens[choice] = [tokens[shared:] for tokens in token_lists]
            self.trees[choice] = OptionTree(self.option_tokens[choice])
        definitions = getattr(processor, "cell_type_definitions", None) or {}
        self.definitions = {label: definitions[label] for label in self.options_labels("cell_type")
                            if definitions.get(label)}

    def options_labels(self, choice: str) -> list[str]:
        return [option.labels[0][1] for option in self.options.get(choice, [])]

    @torch.no_grad()
    def describe(self, model, inputs: Mapping[str, torch.Tensor]) -> SchemaDescriptions:
        """Describe each cell of `inputs` (a generation batch from the processor)."""
        from .text_padding import text_pad_token_id

        if hasattr(model, "get_base_model"):  # a PEFT model (the recipe's, during calibration): its LoRA layers are
            model = model.get_base_model()    # in place in the base model, which is called directly
        model.eval()
        tokenizer = self.processor.tokenizer
        pad_id = text_pad_token_id(tokenizer)
        state = _DecodingState(model, inputs)
        n = inputs["input_ids"].shape[0]
        texts = [""] * n
        labels: list[dict[str, str | None]] = [{} for _ in range(n)]
        choice_results: dict[str, ChoiceResult] = {}
        pending: list[list[int]] = [[] for _ in range(n)]  # chosen tokens not yet run, written with the next prefix
        for choice, options in self.options.items():
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
                    pending[row] += tokens_in_context(tokenizer, texts[row] + text, sentence)
                    text += sentence
                texts[row] += text
        self.calls, self.tokens = state.calls, state.tokens
        temperatures = {"cell_type": float(getattr(model.config, "cell_type_temperature", 1.0)),
                        **(getattr(model.config, "field_temperatures", None) or {})}
        scores, likelihoods = self._scores(choice_results, labels, temperatures)
        return SchemaDescriptions([t.strip() for t in texts], labels, scores, likelihoods)

    def _scores(self, results: Mapping[str, ChoiceResult], labels: list[dict], temperatures: Mapping[str, float]
                ) -> tuple[list[dict], list[dict]]:
        """Each field's probability: the chosen label's share of the completed options' softmax (summed over the
        options stating the same label, for the donor clause's three fields)."""
        scores = [{} for _ in labels]
        likelihoods = [{} for _ in labels]
        for choice, result in results.items():
            options = self.options[choice]
            for row, done in enumerate(result.completed):
                if not done:
                    continue
                indices = list(done)
                values = torch.tensor([done[i] for i in indices], dtype=torch.float64)
                # each choice's temperature, fitted on validation by the recipe (1.0 where none was)
                probabilities = (values / float(temperatures.get(choice, 1.0))).softmax(dim=0).tolist()
                for name in CHOICE_FIELDS[choice]:
                    chosen = labels[row].get(name)
                    if chosen is None:  # a field without known labels, left out of the description
                        continue
                    scores[row][name] = min(1.0, sum(p for i, p in zip(indices, probabilities)
                                                      if dict(options[i].labels).get(name) == chosen))
                likelihoods[row][choice] = {options[i].text: done[i] for i in indices}
        return scores, likelihoods


def schema_results(processor, described: SchemaDescriptions) -> list[dict]:
    """Pipeline results: each description with the fields the decoder chose (taken from the choices, not read back
    from the text), their ontology ids, and `<field>_score` for every chosen field.

    `parsed` says whether the text also reads back into the same fields; it is False only where a label holds the
    template's own punctuation (a few ontology labels contain a period, e.g. "St. Louis encephalitis"), and the
    fields are the chosen ones either way."""
    definitions = getattr(processor, "cell_type_definitions", None) or {}
    results = []
    for text, labels, scores in zip(described.texts, described.labels, described.scores):
        cell_type = labels.get("cell_type")
        definition = definitions.get(cell_type)
        chosen = CellDescription(
            cell_type=cell_type, cell_type_definition=definition, tissue=labels.get("tissue"),
            sex=labels.get("sex"), disease=labels.get("disease"), age_group=labels.get("age_group"),
            pathways=tuple(p for p in (labels.get("pathway_1"), labels.get("pathway_2")) if p is not None),
        )
        parsed = parse_or_none(text) == chosen
        fields = chosen.to_dict()
        for name in ONTOLOGY_FIELDS:
            label = fields.get(name)
            fields[f"{name}_ontology_term_id"] = processor.ontology_term_ids.get(name, {}).get(label) if label else None
        result = {"description": text, "parsed": parsed, **fields}
        for name in ("cell_type", "tissue", "sex", "disease", "age_group"):
            result[f"{name}_score"] = scores.get(name)
        pathway_scores = [scores[k] for k in ("pathway_1", "pathway_2") if k in scores]
        result["pathways_score"] = float(torch.tensor(pathway_scores).prod()) if pathway_scores else None
        results.append(result)
    return results


__all__ = ["OptionTree", "SchemaDecoder", "SchemaDescriptions", "known_labels", "schema_results",
           "tokens_in_context"]
