"""Expression baselines that Cell2Text is compared with, on the same split and the same cells.

- ``majority``: the most frequent training label for every cell.
- ``logistic_regression``: multinomial logistic regression on the log-normalised expression;
  its inverse regularisation C is picked by stratified k-fold cross-validation on the
  training split only (never on the test cells).
- ``knn``: k nearest neighbours (k=15, Euclidean) in a PCA of the log expression, the PCA
  fitted on the training cells only.

Inputs are cells x genes matrices (numpy or scipy sparse) of log1p-normalised expression
with the same gene columns for train and test. ``baseline_reports`` turns the predictions
into the ``"baselines"`` section of the evaluation results (see ``training.evaluation.report``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from training.evaluation.metrics import classification_report

logger = logging.getLogger(__name__)


def _check_inputs(X_train, y_train: Sequence[str], X_test) -> None:
    if X_train.shape[0] != len(y_train):
        raise ValueError(
            f"X_train has {X_train.shape[0]} cells but y_train has {len(y_train)} labels: "
            "pass one label per training cell."
        )
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(
            f"X_train has {X_train.shape[1]} genes but X_test has {X_test.shape[1]}: "
            "subset both to the same genes in the same order."
        )
    if len(y_train) == 0:
        raise ValueError("No training cells: the split left the training set empty.")
    if any(label is None for label in y_train):
        raise ValueError("y_train contains None: drop training cells without a label first.")


def majority_baseline(y_train: Sequence[str], n_test: int) -> list[str]:
    """The most frequent training label (ties broken by first occurrence), for every test cell."""
    label = Counter(y_train).most_common(1)[0][0]
    return [label] * n_test


def _cv_folds(y: Sequence[str], max_folds: int) -> int:
    """As many folds as the rarest class allows (at least 2, at most ``max_folds``)."""
    return max(2, min(max_folds, min(Counter(y).values())))


def choose_c(
    X_train, y_train: Sequence[str], cs: Sequence[float], cv_folds: int = 5, seed: int = 0
) -> float:
    """C with the best mean cross-validated accuracy on the training cells (smallest on ties)."""
    cv = StratifiedKFold(n_splits=_cv_folds(y_train, cv_folds), shuffle=True, random_state=seed)
    y = np.asarray(y_train)
    scores = {}
    for c in sorted(cs):
        model = LogisticRegression(C=c, max_iter=1000)
        scores[c] = float(cross_val_score(model, X_train, y, cv=cv).mean())
    logger.info("logistic regression CV accuracy by C: %s", scores)
    return max(scores, key=lambda c: (scores[c], -c))


def logistic_regression_baseline(
    X_train,
    y_train: Sequence[str],
    X_test,
    cs: Sequence[float] = (0.01, 0.1, 1.0),
    cv_folds: int = 5,
    seed: int = 0,
) -> list[str]:
    """Logistic regression on log expression, C chosen by CV on the training split."""
    if len(set(y_train)) < 2:
        return majority_baseline(y_train, X_test.shape[0])
    c = choose_c(X_train, y_train, cs, cv_folds, seed)
    model = LogisticRegression(C=c, max_iter=1000).fit(X_train, np.asarray(y_train))
    return [str(p) for p in model.predict(X_test)]


def knn_baseline(
    X_train, y_train: Sequence[str], X_test, k: int = 15, n_pcs: int = 50, seed: int = 0
) -> list[str]:
    """kNN on a PCA of the log expression; the PCA is fitted on the training cells only."""
    n_components = max(1, min(n_pcs, X_train.shape[1] - 1, X_train.shape[0] - 1))
    # arpack centres sparse input implicitly, so the matrix is never densified.
    solver = "arpack" if sp.issparse(X_train) else "auto"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(X_train)
    knn = KNeighborsClassifier(n_neighbors=min(k, X_train.shape[0]))
    knn.fit(pca.transform(X_train), np.asarray(y_train))
    return [str(p) for p in knn.predict(pca.transform(X_test))]


def run_expression_baselines(X_train, y_train: Sequence[str], X_test) -> dict[str, list[str]]:
    """Predicted labels of the test cells by each expression baseline, keyed by baseline name."""
    _check_inputs(X_train, y_train, X_test)
    X_train = sp.csr_matrix(X_train) if sp.issparse(X_train) else np.asarray(X_train)
    X_test = sp.csr_matrix(X_test) if sp.issparse(X_test) else np.asarray(X_test)
    runs = {
        "majority": lambda: majority_baseline(y_train, X_test.shape[0]),
        "logistic_regression": lambda: logistic_regression_baseline(X_train, y_train, X_test),
        "knn": lambda: knn_baseline(X_train, y_train, X_test),
    }
    predictions = {}
    for name, run in runs.items():
        start = time.perf_counter()
        # One BLAS thread: the dense products here are small (cells x classes or x PCs), and
        # threaded BLAS on a busy machine spins: measured 2-20x slower on 2 shared cores.
        with threadpool_limits(limits=1, user_api="blas"):
            predictions[name] = run()
        logger.info("baseline %s took %.2f s", name, time.perf_counter() - start)
    return predictions


def baseline_reports(
    y_test: Sequence[str], predictions: dict[str, Sequence[str | None]], field: str = "cell_type",
    similarity_scores: dict[str, Sequence[float]] | None = None,
) -> dict[str, dict[str, dict]]:
    """``{baseline: {field: classification_report}}``, the results' ``"baselines"`` section; with
    `similarity_scores` (per baseline, each cell's ontology similarity: `evaluate.label_similarity_scores`) each
    report also holds their mean, ``ontology_similarity``, as Cell2Text's does."""
    reports = {name: {field: classification_report(y_test, pred)} for name, pred in predictions.items()}
    for name, scores in (similarity_scores or {}).items():
        reports[name][field]["ontology_similarity"] = float(np.mean(scores))
    return reports
