"""Geneformer's pickled dictionaries (gene -> token id, gene -> median), read safely, and where a vocabulary came from.

Geneformer ships its vocabulary as pickles. They are read with a restricted unpickler that loads only plain dicts
of str -> int/float (numpy numeric scalars included), never a class or function, so a tampered file cannot run
code. A feature extractor records its vocabulary's origin in ``vocabulary_source`` (the files' SHA-256 for
Geneformer dictionaries), which the model checks against its gene encoder.

This file travels as remote code with the feature extractor: it imports only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from typing import Any

import numpy as np


class _NumericDictUnpickler(pickle.Unpickler):
    """Unpickler for Geneformer's dictionaries: plain dicts of str -> int/float only.

    No class or function can be loaded, except numpy's numeric scalar reconstruction (a median
    dictionary written with numpy float values pickles them that way) and, for pickle protocol 2, the latin-1
    encoding of a scalar's bytes; those are restricted to numeric dtypes and checked again after loading.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numeric_scalar
        if module == "numpy" and name == "dtype":
            return _numeric_dtype
        if module == "_codecs" and name == "encode":  # protocol 2 (Python 2's) writes a scalar's bytes this way
            return _latin1_bytes
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a Geneformer dictionary must hold only a plain dict of "
            "str -> int/float (no classes or functions)"
        )


def _numeric_dtype(spec: Any, *args: Any) -> np.dtype:
    """np.dtype restricted to integer/float dtypes (no object dtype, which could read pointers)."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refusing numpy dtype spec {spec!r}")
    dtype = np.dtype(spec)
    if dtype.kind not in "iuf":
        raise pickle.UnpicklingError(f"refusing non-numeric numpy dtype {dtype}")
    return dtype


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    """codecs.encode restricted to what pickle protocol 2 writes for bytes: a str encoded as latin-1."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing a codecs call that is not protocol 2's bytes (str, 'latin1')")
    return text.encode("latin-1")


def _numeric_scalar(dtype: Any, data: Any) -> float | int:
    """Rebuild a numpy numeric scalar from its bytes, as a plain Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not a plain number")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar in pickle")
    return np.frombuffer(data, dtype=dtype)[0].item()


# What unpickling a file that is no pickle (empty, text, truncated, corrupt) raises besides UnpicklingError: a
# corrupt length field asks for more memory than the file holds (MemoryError), a corrupt opcode argument is of
# another type or value.
_CORRUPT_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                          KeyError, OverflowError, MemoryError)
TOKEN_DICTIONARY = "Geneformer token dictionary (token_dictionary.pkl)"
GENE_MEDIAN_DICTIONARY = "Geneformer gene median dictionary (gene_median_dictionary.pkl)"


def load_numeric_dict(path: str | os.PathLike, value_type: type, what: str = "dictionary") -> dict[str, Any]:
    """Load a pickled dict of str -> int (``value_type=int``) or str -> float safely; a file that is none, or an
    empty one, is refused with a ValueError naming it and `what` it should be."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        obj = _NumericDictUnpickler(io.BytesIO(raw)).load()
    except _CORRUPT_PICKLE_ERRORS as error:
        raise _not_a(path, what, value_type, str(error) or type(error).__name__) from error
    if not isinstance(obj, dict):
        raise _not_a(path, what, value_type, f"it holds a {type(obj).__name__}")
    if not obj:
        raise _not_a(path, what, value_type, "it is empty")
    allowed = (int,) if value_type is int else (int, float)
    for key, value in obj.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, allowed):
            raise _not_a(path, what, value_type, f"found entry {key!r}: {value!r} "
                                                 f"({type(key).__name__} -> {type(value).__name__})")
    return {key: value_type(value) for key, value in obj.items()}


def _not_a(path: str | os.PathLike, what: str, value_type: type, problem: str) -> ValueError:
    """The refusal of a file that is no `what` (a pickled dict of str -> `value_type`)."""
    return ValueError(f"{path} is no {what}, a pickled dict of str -> {value_type.__name__}: {problem}. Give that "
                      "file as Geneformer ships it.")


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def load_geneformer_dictionaries(
    token_dictionary_file: str | os.PathLike, gene_median_file: str | os.PathLike
) -> tuple[dict[str, int], dict[str, float], dict[str, Any]]:
    """(gene -> token id, gene -> median, vocabulary_source) from Geneformer's two pickled dictionaries.

    The source is ``{"kind": "geneformer", ...}`` with both files' SHA-256 and names, so a model can tell which
    dictionaries its gene tokens were made with.
    """
    token_ids = load_numeric_dict(token_dictionary_file, int, TOKEN_DICTIONARY)
    medians = load_numeric_dict(gene_median_file, float, GENE_MEDIAN_DICTIONARY)
    special = [key for key in medians if key.startswith("<") and key.endswith(">")]
    if special:  # the token dictionary given as both: refused later for its <pad> median 0, naming no file
        raise _not_a(gene_median_file, GENE_MEDIAN_DICTIONARY, float,
                     f"it holds the special token {special[0]!r}, as a token dictionary does")
    source = {
        "kind": "geneformer",
        "token_dictionary_sha256": sha256_of_file(token_dictionary_file),
        "gene_median_sha256": sha256_of_file(gene_median_file),
        "token_dictionary_file": os.path.basename(str(token_dictionary_file)),
        "gene_median_file": os.path.basename(str(gene_median_file)),
    }
    return token_ids, medians, source


def checked_vocabulary_source(source: dict[str, Any] | None) -> dict[str, Any]:
    """``vocabulary_source`` as a JSON-serialisable dict with a string ``kind`` ({"kind": "unknown"} for None)."""
    if source is None:
        return {"kind": "unknown"}
    if not isinstance(source, dict) or not isinstance(source.get("kind"), str):
        raise ValueError(
            f"vocabulary_source must be a dict with a string 'kind' (geneformer, corpus or unknown), got {source!r}"
        )
    try:
        return json.loads(json.dumps(source))
    except (TypeError, ValueError) as error:
        raise ValueError(f"vocabulary_source must be JSON-serialisable (str, numbers, lists, dicts): {error}") from error


__all__ = ["checked_vocabulary_source", "load_geneformer_dictionaries", "load_numeric_dict", "sha256_of_file"]
