"""Cell-type label scoring and constrained descriptions: every predicted cell type is a known label.

A description's first sentence names the cell type ("This sample consists of a {cell_type}.", rendered by
`description_schema`, the one owner of the template). `score_cell_types` scores every candidate label by the
log-likelihood the model gives that sentence after the prompt. The candidates are the cell-type labels
the processor learnt from its training corpus (`processor.ontology_term_ids["cell_type"]`), so every predicted
cell type has its Cell Ontology id.

Describing uses the schema-constrained decoder (`schema_decoding.py`); here `score_cell_types` is the exhaustive
reference it is tested against and what fits `cell_type_temperature` (the former describe path built on it is the
benchmarks' baseline, `benchmarks/former_describe.py`).

This file travels as remote code with a saved model: it imports only torch and its sibling modules.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .description_schema import CellDescription, DescriptionParseError, parse_description, render_description
from .cell_inputs import CELL_INPUT_NAMES

# Rows (cells x candidates) of one scoring forward pass: bounds the logits held at once (rows x span x vocabulary).
DEFAULT_MAX_ROWS = 64


def cell_type_sentence(label: str) -> str:
    """The first sentence of a description naming `label` (with its terminating period), as the template renders it."""
    return render_description(CellDescription(cell_type=label))


def cell_type_candidates(processor) -> list[str]:
    """The cell-type labels the processor knows (learnt from the training corpus, each with its ontology id)."""
    labels = sorted(processor.ontology_term_ids.get("cell_type", {}))
    if not labels:
        raise ValueError(
            "The processor knows no cell-type labels (processor.ontology_term_ids['cell_type'] is empty), so the cell "
            "type cannot be constrained: pass candidates=[...] or turn the constraint off (constrained=False)."
        )
    return labels


def candidate_sentence_tokens(tokenizer, candidates: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The tokens of the candidates' cell-type sentences: those every sentence starts with ("This sample consists
    of a"), leaving each candidate at least one token of its own, and each candidate's own tokens after them (its
    label and the terminating period). Scoring a candidate is scoring its own tokens after the shared ones."""
    sentences = [tokenizer(cell_type_sentence(c), add_special_tokens=False)["input_ids"] for c in candidates]
    shared = shared_prefix_length(sentences)
    return sentences[0][:shared], [s[shared:] for s in sentences]


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every list shares, leaving each list at least one token of its own."""
    shared = 0
    while shared < min(map(len, token_lists)) - 1 and len({tokens[shared] for tokens in token_lists}) == 1:
        shared += 1
    return shared


def constrains_by_default(processor) -> bool:
    """Whether the processor knows cell-type labels to constrain to: the pipeline's and CLI's default."""
    return bool(processor.ontology_term_ids.get("cell_type"))


def constrains(processor, constrained: bool | None) -> bool:
    """Whether describing constrains to the processor's labels: as asked (`constrained`; None: by default) where the
    processor knows cell-type labels, never where it knows none (there is nothing to choose among)."""
    return constrains_by_default(processor) and (constrained is None or bool(constrained))


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    candidates = list(candidates)
    if not candidates:
        raise ValueError("No candidate labels: pass at least one cell-type label.")
    if len(set(candidates)) != len(candidates):
        raise ValueError("Candidate labels repeat; pass each label once.")
    for label in candidates:
        try:
            parsed = parse_description(cell_type_sentence(label)).cell_type
        except (ValueError, DescriptionParseError):
            parsed = None
        if parsed != label:
            raise ValueError(
                f"Candidate label {label!r} does not read back from its sentence {cell_type_sentence(label)!r} (a "
                "period inside a label, other than between digits as in 'NK1.1', ends the sentence early); remove it from the "
                "candidates."
            )
    return candidates


@dataclass
class CellTypeScores:
    """Scores of the candidate labels for a batch of cells.

    `log_likelihoods[i, j]` is the total log-likelihood (natural log) of candidate j's tokens for cell i, from the
    first token where candidates' sentences differ through the terminating period; the tokens all candidates
    share ("This sample consists of") have the same likelihood for every candidate and cancel in the softmax.
    """

    candidates: list[str]
    log_likelihoods: torch.Tensor  # (cells, candidates), float32, on the CPU
    temperature: float = 1.0  # the model's cell_type_temperature: divides the log-likelihoods in the softmax

    @property
    def probabilities(self) -> torch.Tensor:
        """(cells, candidates): softmax over the candidates' total log-likelihoods / temperature; rows sum to 1."""
        return (self.log_likelihoods / self.temperature).softmax(dim=-1)

    @property
    def labels(self) -> list[str]:
        """The most likely candidate of each cell."""
        return [self.candidates[j] for j in self.log_likelihoods.argmax(dim=-1).tolist()]

    @property
    def scores(self) -> list[float]:
        """The probability of each cell's chosen label among the candidates."""
        return self.probabilities.max(dim=-1).values.tolist()

    def score_of(self, labels: Sequence[str | None]) -> list[float | None]:
        """The probability of each given label among the candidates (None for a label that is not a candidate)."""
        index = {label: j for j, label in enumerate(self.candidates)}
        probabilities = self.probabilities
        return [None if label not in index else float(probabilities[i, index[label]]) for i, label in enumerate(labels)]


def cache_rows(cache, rows: torch.Tensor):
    """A cache holding the batch rows `rows` of `cache` (rows may repeat); `cache` itself is left untouched, and
    only the selected rows are copied."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)  # indexing makes new tensors: the shared layers' tensors are not changed
    return selected


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows, as `generate` computes them (padding at position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_cell_types(
    model,
    processor,
    inputs: Mapping[str, torch.Tensor],
    candidates: Sequence[str] | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> CellTypeScores:
    """Score every candidate cell-type label for each cell of `inputs` (a generation batch from the processor).

    The prompt (with each cell's soft tokens, so the gene encoder runs once per cell) and the sentence start that
    all candidates share are run once per cell; the language model's KV cache of them is then reused for every
    candidate, and each candidate's remaining tokens (label and terminating period) are run in batches of at
    most `max_rows` (cell, candidate) pairs.

    No length normalisation: a candidate's score is the total log-likelihood of its tokens, so the softmax over
    candidates is the model's own probability of each label's sentence given that the sentence is one of the
    candidates' (a distribution that calibration can be measured on). The terminating period keeps a short
    label from winning merely by being the prefix of a longer one ("B cell." must be followed by the period).
    """
    candidates = _check_candidates(cell_type_candidates(processor) if candidates is None else candidates)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}.")
    model.eval()
    device = inputs["input_ids"].device
    shared_tokens, suffixes = candidate_sentence_tokens(processor.tokenizer, candidates)
    n_cells = inputs["input_ids"].shape[0]
    prefix = torch.tensor(shared_tokens, dtype=inputs["input_ids"].dtype, device=device).expand(n_cells, -1)
    input_ids = torch.cat([inputs["input_ids"], prefix], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(prefix)], dim=1)
    cell_inputs = {k: inputs[k] for k in CELL_INPUT_NAMES if inputs.get(k) is not None}
    prefill = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=left_padded_positions(attention_mask), use_cache=True, logits_to_keep=1, **cell_inputs)
    first_log_probs = prefill.logits[:, -1].float().log_softmax(dim=-1)  # (cells, vocabulary)

    # Each candidate's first own token is scored by the prefill; the rest by running all but its last token on the
    # cached prefix. Candidates of one length go together, so no row is padded.
    log_likelihoods = first_log_probs[:, [s[0] for s in suffixes]].cpu()
    next_positions = attention_mask.sum(dim=1)
    by_length: dict[int, list[int]] = {}
    for j, suffix in enumerate(suffixes):
        by_length.setdefault(len(suffix), []).append(j)
    for length, members in sorted(by_length.items()):
        if length == 1:
            continue
        per_chunk = min(len(members), max_rows)
        cells_per_chunk = max(1, max_rows // per_chunk)
        for cell_start in range(0, n_cells, cells_per_chunk):
            cells = torch.arange(cell_start, min(cell_start + cells_per_chunk, n_cells), device=device)
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                n, m = len(cells), len(chunk)
                ids = torch.tensor([suffixes[j] for j in chunk], device=device).repeat(n, 1)  # (n * m, length)
                rows_mask = torch.cat([attention_mask[cells].repeat_interleave(m, dim=0),
                                       torch.ones_like(ids[:, :-1])], dim=1)
                positions = next_positions[cells].repeat_interleave(m)[:, None] + torch.arange(length - 1).to(device)
                logits = model(input_ids=ids[:, :-1], attention_mask=rows_mask, position_ids=positions,
                               cache=cache_rows(prefill.cache, cells.repeat_interleave(m)), use_cache=True).logits
                log_probs = logits.float().log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                rest = log_probs.sum(dim=1).view(n, m).cpu()
                log_likelihoods[cells.cpu()[:, None], torch.tensor(chunk)[None, :]] += rest
    return CellTypeScores(candidates, log_likelihoods, float(getattr(model.config, "cell_type_temperature", 1.0)))


def fit_temperature(log_likelihoods: torch.Tensor, targets: torch.Tensor, bounds: tuple[float, float] = (0.05, 100.0)
                    ) -> float:
    """The temperature T minimising the negative log-likelihood of `targets` (candidate index per cell) under
    softmax(log_likelihoods / T): temperature scaling (Guo et al., 2017), fitted on held-out cells.

    The NLL is convex in 1/T, so a golden-section search over 1/T in 1/bounds finds its minimum.
    """
    if log_likelihoods.ndim != 2 or targets.shape != (log_likelihoods.shape[0],) or not len(targets):
        raise ValueError(f"Pass (cells, candidates) log-likelihoods and one target per cell; got "
                         f"{tuple(log_likelihoods.shape)} and {tuple(targets.shape)}.")
    scores, targets = log_likelihoods.double(), targets.long()

    def nll(inverse_temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(scores * inverse_temperature, targets))

    low, high = 1.0 / bounds[1], 1.0 / bounds[0]
    ratio = (5 ** 0.5 - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(80):  # the bracket shrinks 0.618x a step: far below float precision of 1/T
        if nll(a) < nll(b):
            high, b = b, a
            a = high - ratio * (high - low)
        else:
            low, a = a, b
            b = low + ratio * (high - low)
    return 2.0 / (low + high)


__all__ = [
    "CellTypeScores",
    "cell_type_candidates",
    "cell_type_sentence",
    "fit_temperature",
    "constrains_by_default",
    "cache_rows",
    "candidate_sentence_tokens",
    "score_cell_types",
]
