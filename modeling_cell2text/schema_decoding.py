"""Schema-constrained decoding: every field of a description chosen among known labels, none written token by token.

A description follows a fixed template (`description_schema`): once its labels are chosen, its words are known. So
the decoder writes the template words and the cell type's Cell Ontology definition itself (fed to the model in one
forward pass per segment) and lets the model choose only the labels, each among the labels the processor learnt from
its training corpus: the cell type, the tissue, the donor clause (sex, disease and age group), and two different
pathways. Every description parses by construction and every label has its ontology id.

One choice is a search over a prefix tree of the options' tokens (each option tokenized as it is written after the
text before it), decoded for all cells of a batch at once. Each step feeds, per cell, the newest token of each of
the `num_beams` best partial options in one forward pass; the partial options of a cell share the cell's cached
prompt and see only their own ancestors (tree attention: a 4D attention mask over the tree's tokens), so no cache
is copied per option. The search ranks options by the total log-likelihood of their tokens (as exhaustive scoring
does; tokens all options share are written, not scored) and ends when every kept partial option is complete; the
best complete option is chosen. Model calls per batch: the prefill, one per choice to write the text before it,
and at most the depth of the choice's tree; none scales with the number of labels.

The score of a field is its chosen label's probability: the softmax of the (temperature-scaled) log-likelihoods of
the complete options the search reached, others counting as 0, so the scores of a field's labels sum to 1. With
`num_beams` at least the number of options it is exhaustive scoring.

This file travels as remote code with a saved model: it imports only torch and its sibling modules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .description_schema import SchemaOption, definition_text, schema_options
from .cell_inputs import CELL_INPUT_NAMES

logger = logging.getLogger(__name__)

DEFAULT_NUM_BEAMS = 4
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
                node = nxt
            self.ends[node].append(option)
        self.max_depth = max(self.depth)


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

    def _forward(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor
                 ) -> torch.Tensor:
        """Run `ids` (cells, q) on the cache; `allowed` (cells, q, cached + q) says what each new token sees; `real`
        marks the tokens that are not padding (counted in `tokens`)."""
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions, cache=self.cache,
                         use_cache=True)
        self.calls += 1
        self.tokens += int(real.sum())
        return out.logits.float().log_softmax(dim=-1)

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
        log_probs = self._forward(ids, allowed, positions, real)
        lengths = real.sum(dim=1)
        written = lengths > 0
        last = (lengths - 1).clamp(min=0)
        self.log_probs = torch.where(written[:, None], log_probs[torch.arange(n), last], self.log_probs)
        self.visible = torch.cat([self.visible, real], dim=1)
        self.next_position = self.next_position + lengths

    def choose(self, tree: OptionTree, num_beams: int, excluded: Sequence[int | None], pad_id: int) -> ChoiceResult:
        """Search `tree` for each cell (see the module doc); the cache is left as it was."""
        n = len(excluded)
        start = self.cache.get_seq_length()
        beams: list[list[_Beam]] = [[_Beam(0, 0.0)] for _ in range(n)]
        completed: list[dict[int, float]] = [{} for _ in range(n)]
        tree_tokens = 0  # tree tokens appended to the cache since `start`
        while True:
            chosen: list[list[tuple[_Beam, int, int, float]]] = []  # per cell: (parent, token, node, ll)
            for row in range(n):
                expansions = []
                for beam in beams[row]:
                    log_probs = self.log_probs[row] if beam.log_probs is None else beam.log_probs
                    children = tree.children[beam.node]
                    if not children:
                        continue
                    tokens = torch.tensor(list(children), device=self.device)
                    for token, value in zip(children, log_probs[tokens].tolist()):
                        expansions.append((beam, token, children[token], beam.log_likelihood + value))
                for beam, token, node, ll in expansions:
                    for option in tree.ends[node]:
                        if option != excluded[row] and ll > completed[row].get(option, -float("inf")):
                            completed[row][option] = ll
                open_ = [e for e in expansions if tree.children[e[2]]]
                open_.sort(key=lambda e: -e[3])
                chosen.append(open_[:num_beams])
            width = max(map(len, chosen))
            if width == 0:
                break
            ids = torch.full((n, width), pad_id, dtype=torch.long, device=self.device)
            real = torch.zeros((n, width), dtype=torch.bool, device=self.device)
            sees_tree = torch.zeros((n, width, tree_tokens + width), dtype=torch.bool, device=self.device)
            positions = torch.zeros((n, width), dtype=torch.long, device=self.device)
            for row, expansions in enumerate(chosen):
                for slot, (parent, token, node, _) in enumerate(expansions):
                    ids[row, slot] = token
                    real[row, slot] = True
                    sees_tree[row, slot, list(parent.path)] = True
                    positions[row, slot] = self.next_position[row] + tree.depth[node] - 1
            sees_tree[:, torch.arange(width), tree_tokens + torch.arange(width)] = True  # itself
            allowed = torch.cat([self.visible[:, None, :].expand(n, width, -1), sees_tree], dim=2)
            log_probs = self._forward(ids, allowed, positions, real)
            beams = [[_Beam(node, ll, parent.path + (tree_tokens + slot,), log_probs[row, slot])
                      for slot, (parent, token, node, ll) in enumerate(expansions)]
                     for row, expansions in enumerate(chosen)]
            tree_tokens += width
        if tree_tokens:
            self.cache.crop(-(self.cache.get_seq_length() - start))  # negative: tokens to remove
        picks = [max(done, key=done.get) if done else None for done in completed]
        return ChoiceResult(picks, completed)


def known_labels(processor) -> dict[str, list[str]]:
    """Each field's labels the processor learnt from its training corpus ("pathways": the pathway names)."""
    labels = {name: sorted(values) for name, values in (getattr(processor, "ontology_term_ids", None) or {}).items()}
    labels["age_group"] = list(getattr(processor, "age_groups", None) or [])
    labels["pathways"] = sorted(getattr(processor, "pathway_names", None) or [])
    return labels


class SchemaDecoder:
    """The options of every choice, tokenized once for a processor; `describe` decodes batches with it."""

    def __init__(self, processor, num_beams: int = DEFAULT_NUM_BEAMS):
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
        self.processor = processor
        self.num_beams = num_beams
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
            state.write([tokens + self.shared_tokens[choice] for tokens in pending], pad_id)
            excluded = choice_results["pathway_1"].chosen if choice == "pathway_2" else [None] * n
            result = state.choose(self.trees[choice], self.num_beams, excluded, pad_id)
            choice_results[choice] = result
            pending = [[] for _ in range(n)]
            for row, pick in enumerate(result.chosen):
                if pick is None:  # no option left (a single pathway name, taken by the first)
                    continue
                option: SchemaOption = options[pick]
                labels[row].update(dict(option.labels))
                text = option.text
                pending[row] = list(self.option_tokens[choice][pick])
                if choice == "cell_type" and labels[row]["cell_type"] in self.definitions:
                    sentence = definition_text(self.definitions[labels[row]["cell_type"]])
                    pending[row] += tokens_in_context(tokenizer, texts[row] + text, sentence)
                    text += sentence
                texts[row] += text
        self.calls, self.tokens = state.calls, state.tokens
        temperature = float(getattr(model.config, "cell_type_temperature", 1.0))
        scores, likelihoods = self._scores(choice_results, labels, temperature)
        return SchemaDescriptions([t.strip() for t in texts], labels, scores, likelihoods)

    def _scores(self, results: Mapping[str, ChoiceResult], labels: list[dict], temperature: float
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
                probabilities = (values / temperature).softmax(dim=0).tolist()
                for name in CHOICE_FIELDS[choice]:
                    chosen = labels[row].get(name)
                    if chosen is None:  # a field without known labels, left out of the description
                        continue
                    scores[row][name] = sum(p for i, p in zip(indices, probabilities)
                                            if dict(options[i].labels).get(name) == chosen)
                likelihoods[row][choice] = {options[i].text: done[i] for i in indices}
        return scores, likelihoods


def schema_results(processor, described: SchemaDescriptions) -> list[dict]:
    """Pipeline results: the processor's parsed fields of each description (which parses by construction), the
    ontology ids, and `<field>_score` for every chosen field."""
    results = processor.parse_descriptions(described.texts)
    for result, labels, scores in zip(results, described.labels, described.scores):
        if not result["parsed"]:
            raise RuntimeError(f"internal error: a schema-constrained description does not parse: "
                               f"{result['description']!r}")
        for name in ("cell_type", "tissue", "sex", "disease", "age_group"):
            result[f"{name}_score"] = scores.get(name)
        pathway_scores = [scores[k] for k in ("pathway_1", "pathway_2") if k in scores]
        result["pathways_score"] = float(torch.tensor(pathway_scores).prod()) if pathway_scores else None
    return results


__all__ = ["OptionTree", "SchemaDecoder", "SchemaDescriptions", "known_labels", "schema_results",
           "tokens_in_context"]
