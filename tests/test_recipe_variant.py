"""benchmarks/recipe_variant.py: an output folder is reused only for the run that wrote it."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _recipe_variant():
    spec = importlib.util.spec_from_file_location("recipe_variant", REPO / "benchmarks" / "recipe_variant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_reuses_models_only_of_the_same_change_and_folds(tmp_path):
    variant = _recipe_variant()
    result = tmp_path / "recipe_variant.json"
    folds = tmp_path / "folds"
    args = argparse.Namespace(overrides=["num_train_epochs=2"], folds_dir=folds, resume=False)
    variant.check_resumable(result, args)  # nothing there yet
    result.write_text(json.dumps({"overrides": ["num_train_epochs=2"], "folds_dir": str(folds)}))
    with pytest.raises(SystemExit, match="pass --resume"):
        variant.check_resumable(result, args)
    variant.check_resumable(result, argparse.Namespace(**{**vars(args), "resume": True}))
    for other in ({"overrides": ["num_train_epochs=3"]}, {"folds_dir": tmp_path / "other"}):
        with pytest.raises(SystemExit, match="same --set and --folds-dir"):
            variant.check_resumable(result, argparse.Namespace(**{**vars(args), "resume": True, **other}))


def test_set_takes_name_value_pairs():
    variant = _recipe_variant()
    assert variant.recipe_overrides(["a=1", "b=x=y"]) == ["--a", "1", "--b", "x=y"]
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        variant.recipe_overrides(["num_train_epochs"])
