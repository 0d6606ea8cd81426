"""Ontology-aware similarity between a true and a predicted term (the paper's PageRank metric).

Score of a prediction = personalized PageRank (restart probability 1 - alpha, all restarts on
the true term) of the predicted term, log-scaled and min-max normalised over all terms of
the ontology, so an exact match scores 1 and near misses (parents, children, siblings) score
high. The walk runs on the *undirected* version of the child -> parent graph: on the
directed graph all mass would flow up to the root and children or siblings of the true term
would get none.

PageRank is computed exactly, by solving ``(I - alpha P^T) x = (1 - alpha) e_true`` with one
sparse LU factorisation per ontology; this is the fixed point that
``networkx.pagerank(G.to_undirected(), alpha, personalization={true: 1})`` converges to. An
iterative solver stopped at a tolerance leaves the smallest scores (which set the bottom of
the log scale, and so every score) depending on the tolerance and starting vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["OntologySimilarity"]


class OntologySimilarity:
    """PageRank-based similarity of predicted to true ontology terms.

    Args:
        ontology: an ontology name understood by ``processing.ontologies.ontology_graph``
            ("CL", "UBERON", "MONDO"), or a networkx graph with edges child -> parent.
        alpha: PageRank damping factor (probability of following an edge); the paper uses 0.9.
        cache_size: how many true terms keep their score vector cached.

    A predicted term that is None (the text did not parse) or not in the graph scores 0.0,
    as does a term in another connected component than the true term. A true term not in the
    graph raises ValueError. With a name, deprecated ids are first mapped to their
    ``replaced_by`` term.
    """

    def __init__(self, ontology: str | nx.Graph, alpha: float = 0.9, cache_size: int = 512) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
        self.alpha = alpha
        self._resolve = _identity
        if isinstance(ontology, str):
            from processing import ontologies

            self.name = ontology
            graph = ontologies.ontology_graph(ontology)
            self._resolve = _current_term
        elif isinstance(ontology, nx.Graph):
            self.name = ontology.graph.get("name", "custom")
            graph = ontology
        else:
            raise TypeError(f"ontology must be an ontology name or a networkx graph, got {type(ontology)}.")
        self.nodes = list(graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self._graph = graph
        self._lu: spla.SuperLU | None = None
        self.normalized_scores = lru_cache(maxsize=cache_size)(self._normalized_scores)

    def _factorized(self) -> spla.SuperLU:
        """LU factors of ``I - alpha P^T`` for the undirected random walk (built once, lazily)."""
        if self._lu is None:
            undirected = self._graph.to_undirected(as_view=True)
            adjacency = nx.to_scipy_sparse_array(undirected, nodelist=self.nodes, format="csr", dtype=float)
            adjacency.data[:] = 1.0
            degree = np.asarray(adjacency.sum(axis=1)).ravel()
            # An isolated node keeps its walker (networkx sends dangling mass back to the
            # restart node, which for an isolated true term is the same thing).
            adjacency = adjacency + sp.diags((degree == 0).astype(float))
            degree = np.maximum(degree, 1.0)
            transition = sp.diags(1.0 / degree) @ adjacency
            system = sp.identity(len(self.nodes), format="csc") - self.alpha * transition.T.tocsc()
            self._lu = spla.splu(system.tocsc())
        return self._lu

    def pagerank(self, true_id: str) -> np.ndarray:
        """Personalized PageRank vector (over ``self.nodes``) restarting at ``true_id``."""
        position = self._position(true_id)
        restart = np.zeros(len(self.nodes))
        restart[position] = 1.0 - self.alpha
        scores = self._factorized().solve(restart)
        scores[scores < 1e-300] = 0.0  # rounding noise in other components
        return scores

    def _normalized_scores(self, true_id: str) -> np.ndarray:
        """Log-scaled, min-max normalised PageRank of every term; 0 where unreachable."""
        scores = self.pagerank(true_id)
        reached = scores > 0
        logs = np.log(scores[reached])
        low, high = logs.min(), logs.max()
        normalized = np.zeros_like(scores)
        if high > low:
            normalized[reached] = (logs - low) / (high - low)
        normalized[self.index[true_id]] = 1.0
        return normalized

    def _position(self, true_id: str) -> int:
        if true_id not in self.index:
            raise ValueError(
                f"True term {true_id!r} is not in the {self.name} graph; the reference labels "
                "must be current ontology terms (check the id, or map deprecated ones)."
            )
        return self.index[true_id]

    def contains(self, term_id: str) -> bool:
        """Whether ``term_id`` (or the term that replaced it) is a node of the graph, as a true term must be."""
        return self._resolve(term_id) in self.index

    def score(self, true_id: str, predicted_id: str | None) -> float:
        """Similarity in [0, 1] of ``predicted_id`` to ``true_id`` (exact match = 1)."""
        true_id = self._resolve(true_id)
        self._position(true_id)
        if predicted_id is None:
            return 0.0
        predicted_id = self._resolve(predicted_id)
        if predicted_id == true_id:
            return 1.0
        position = self.index.get(predicted_id)
        if position is None:
            return 0.0
        return float(min(max(self.normalized_scores(true_id)[position], 0.0), 1.0))

    def mean(self, pairs: Iterable[tuple[str, str | None]]) -> float:
        """Mean score over (true_id, predicted_id) pairs, e.g. one pair per test cell."""
        scores = [self.score(true_id, predicted_id) for true_id, predicted_id in pairs]
        if not scores:
            raise ValueError("mean() needs at least one (true_id, predicted_id) pair.")
        return math.fsum(scores) / len(scores)


def _identity(term_id: str) -> str:
    return term_id


def _current_term(term_id: str) -> str:
    """A known deprecated id's replacement; any other id unchanged."""
    from processing import ontologies

    try:
        return ontologies.resolve_term(term_id)
    except KeyError:
        return term_id
