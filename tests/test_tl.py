"""`tl.describe` / `tl.embed`: annotate and embed an AnnData in place (in memory, backed, views, duplicated names)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_pipeline import DESCRIPTION, GENES, local_pipeline, make_adata, save_tiny_model_folder

from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor, tl

DUPLICATED = ["a", "b", "a", "a", "c", "b"]
FIELD_COLUMNS = ("description", "parsed", "cell_type", "cell_type_ontology_term_id", "tissue",
                 "tissue_ontology_term_id", "disease", "disease_ontology_term_id")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tl-model")
    return {
        "trained": save_tiny_model_folder(root, trained=True), "random": save_tiny_model_folder(root, trained=False)
    }


@pytest.fixture(scope="module")
def expected(model_dirs) -> list[str]:
    """The random model's description of each of the 6 cells, one cell at a time (what obs must hold, in order)."""
    pipe = local_pipeline(model_dirs["random"])
    adata = make_adata(6, seed=7)
    # free generation: its texts tell cells apart (constrained ones differ in their scores; test_describe_batching)
    texts = [pipe(adata[i : i + 1], max_new_tokens=6, constrained=False)[0]["description"] for i in range(6)]
    assert len(set(texts)) > 2, "the random model should describe cells differently"
    return [text.replace("\x00", "\ufffd") for text in texts]  # as obs holds them (HDF5 strings hold no NUL)


def describe(adata, model, **kwargs):
    tl.describe(adata, model, max_new_tokens=6, batch_size=4, progress=False, **{"constrained": False, **kwargs})


def test_describe_writes_fields_with_ontology_ids_for_every_cell(model_dirs):
    adata = make_adata(5)
    tl.describe(adata, model_dirs["trained"], max_new_tokens=40, progress=False)
    for column in FIELD_COLUMNS:
        assert f"cell2text_{column}" in adata.obs, column
    assert (adata.obs["cell2text_description"] == DESCRIPTION).all()
    assert adata.obs["cell2text_parsed"].all()
    assert (adata.obs["cell2text_cell_type"] == "B cell").all()
    assert (adata.obs["cell2text_cell_type_ontology_term_id"] == "CL:0000236").all()
    assert list(adata.obs["cell_type"]) == ["unknown"] * 5  # existing columns untouched
    record = adata.uns["cell2text"]
    assert record["model"] == str(model_dirs["trained"])
    assert record["revision"].startswith("sha256:") and len(record["revision"]) == 7 + 64
    assert record["package_version"] == tl.package_version()
    assert "max_new_tokens" not in record["params"]  # constrained: whole
    assert not record["params"]["use_raw"] and "layer" not in record["params"]  # counts from X
    assert record["params"]["trust_remote_code"] is False
    assert record["params"]["constrained"] is True  # the processor knows the corpus's cell-type labels
    scores = adata.obs["cell2text_cell_type_score"]
    assert scores.dtype == float and ((scores > 0) & (scores <= 1)).all()


def test_describe_free_cell_type_has_no_score_and_says_so(model_dirs, tmp_path):
    adata = make_adata(3)
    describe(adata, model_dirs["trained"], constrained=False)
    assert adata.uns["cell2text"]["params"]["constrained"] is False
    assert "cell2text_cell_type_score" not in adata.obs or adata.obs["cell2text_cell_type_score"].isna().all()
    adata.write_h5ad(tmp_path / "free.h5ad")  # the record is writable (no None in uns)


def test_describing_again_leaves_no_column_of_the_earlier_run(model_dirs):
    """The QA finding: a free run after a constrained one kept the constrained run's scores and exact_choice beside
    the new descriptions (tissue_score 1.0 for a description that states no tissue), exit 0."""
    adata = make_adata(3)
    adata.obs["cell2text_notes"] = "mine"  # a user's own column under the same prefix stays
    describe(adata, model_dirs["trained"], constrained=True)
    constrained_columns = set(adata.obs.columns)
    assert {"cell2text_tissue_score", "cell2text_exact_choice"} <= constrained_columns
    assert constrained_columns - {"cell2text_notes"} <= set(tl.described_columns("cell2text")) | set(make_adata(3).obs)
    describe(adata, model_dirs["trained"], constrained=False)
    assert "cell2text_tissue_score" not in adata.obs and "cell2text_exact_choice" not in adata.obs
    assert (adata.obs["cell2text_notes"] == "mine").all()


def test_describe_aligns_by_position_with_duplicated_obs_names(model_dirs, expected):
    adata = make_adata(6, seed=7)
    adata.obs_names = DUPLICATED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: obs_names not unique
        describe(adata, model_dirs["random"], key_added="c2t")
    assert list(adata.obs["c2t_description"]) == expected
    assert list(adata.obs_names) == DUPLICATED
    assert "c2t" in adata.uns and "cell2text" not in adata.uns


def test_describe_and_embed_a_backed_anndata(model_dirs, expected, tmp_path):
    make_adata(6, seed=7).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    describe(backed, model_dirs["random"])
    assert list(backed.obs["cell2text_description"]) == expected
    tl.embed(backed, model_dirs["random"], progress=False)
    in_memory = make_adata(6, seed=7)
    tl.embed(in_memory, model_dirs["random"], progress=False)
    assert np.allclose(backed.obsm["X_cell2text"], in_memory.obsm["X_cell2text"], atol=1e-6)
    # a view of a backed AnnData cannot take new obs columns (anndata): refused before any work
    with pytest.raises(ValueError, match="view of a backed AnnData.*to_memory"):
        describe(backed[1:3], model_dirs["random"])
    backed.file.close()


def test_describe_and_embed_a_view_makes_it_an_actual_anndata(model_dirs, expected):
    parent = make_adata(6, seed=7)
    view = parent[2:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's ImplicitModificationWarning, as in scanpy
        describe(view, model_dirs["random"])
        tl.embed(view, model_dirs["random"], progress=False)
    assert not view.is_view
    assert list(view.obs["cell2text_description"]) == expected[2:5]
    assert view.obsm["X_cell2text"].shape == (3, 32)
    assert "cell2text_description" not in parent.obs and "X_cell2text" not in parent.obsm  # parent untouched


def test_the_record_tells_adata_raw_from_a_layer_named_raw(model_dirs):
    """The counts' source is recorded as the call's arguments: a record of `"layer": "raw"` read alike for
    `adata.raw` and for `adata.layers["raw"]`, so repeating the call from it could read other counts."""
    adata = make_adata(2)
    adata.raw = adata.copy()
    adata.layers["raw"] = adata.X
    records = {}
    for name, source in {"use_raw": {"use_raw": True}, "layer": {"layer": "raw"}}.items():
        tl.embed(adata, model_dirs["random"], progress=False, **source)
        records[name] = adata.uns["X_cell2text"]["params"]
    assert records["use_raw"]["use_raw"] is True and "layer" not in records["use_raw"]
    assert records["layer"]["use_raw"] is False and records["layer"]["layer"] == "raw"


def test_embed_is_the_mean_of_the_encoder_layer_over_gene_positions(model_dirs):
    adata = make_adata(5, seed=2)
    adata.obs_names = ["x", "y", "x", "y", "x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tl.embed(adata, model_dirs["random"], batch_size=2, progress=False)
    embeddings = adata.obsm["X_cell2text"]
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dirs["random"]).eval()
    processor = Cell2TextProcessor.from_pretrained(model_dirs["random"])
    assert embeddings.shape == (5, model.config.gene_encoder_config.hidden_size)
    for row in range(5):  # each cell alone, by hand
        inputs = processor.feature_extractor(adata[row : row + 1], return_tensors="pt")
        with torch.no_grad():
            states = model.model.gene_encoder(
                input_ids=inputs["gene_input_ids"], attention_mask=inputs["gene_attention_mask"],
                output_hidden_states=True,
            ).hidden_states[model.config.gene_encoder_layer][0]
        genes = inputs["gene_token_mask"][0].bool()
        assert np.allclose(embeddings[row], states[genes].mean(dim=0).numpy(), atol=1e-5), row
    record = adata.uns["X_cell2text"]
    assert record["params"]["encoder_layer"] == model.config.gene_encoder_layer
    assert record["params"]["pooling"] == "mean over gene positions"


def test_an_already_loaded_model(model_dirs):
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dirs["trained"])
    adata = make_adata(3)
    tl.describe(adata, model, max_new_tokens=40, progress=False)
    assert (adata.obs["cell2text_description"] == DESCRIPTION).all()
    assert adata.uns["cell2text"]["model"] == str(model_dirs["trained"])


def test_nuclei_described_by_a_model_trained_on_cells_only_are_warned_about_once(model_dirs, caplog):
    """The model card says nuclei are untested for a model trained on cells only, but describing them said nothing:
    the config records the training corpus's suspension types, and describe warns where obs holds a kind it lacks."""
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dirs["trained"])
    for trained, warned in (({"cell": 10}, "2 of the 3 cells are nuclei (single-nucleus RNA-seq)"),
                            ({"nucleus": 10}, "1 of the 3 cells are cells (obs suspension_type 'cell')"),
                            ({"cell": 10, "nucleus": 2}, None), (None, None), ({}, None)):
        model.config.training_suspension_types = trained
        adata = make_adata(3)
        adata.obs["suspension_type"] = ["Nucleus", "cell", "nucleus"]
        caplog.clear()
        with caplog.at_level("WARNING", logger="modeling_cell2text.tl"):
            tl.describe(adata, model, max_new_tokens=40, progress=False)
        unseen = [r.getMessage() for r in caplog.records if "training corpus held none" in r.getMessage()]
        if warned is None:
            assert unseen == []
        else:
            assert len(unseen) == 1 and warned in unseen[0]
            assert f"training_suspension_types: {json.dumps(trained)}" in unseen[0]


def test_a_model_loaded_from_a_subfolder_is_recorded_as_that_folder(model_dirs, tmp_path):
    """transformers names the folder above a subfolder: the record named that folder and the checksum of its
    weights (another model's), and its processor was the one loaded."""
    root = tmp_path / "root"
    shutil.copytree(model_dirs["trained"], root)
    shutil.copytree(model_dirs["random"], root / "v2")
    model = Cell2TextForConditionalGeneration.from_pretrained(root, subfolder="v2")
    adata = make_adata(2)
    tl.describe(adata, model, max_new_tokens=4, constrained=False, progress=False)
    expected = tl.model_provenance(Cell2TextForConditionalGeneration.from_pretrained(root / "v2"))
    assert {key: adata.uns["cell2text"][key] for key in ("model", "revision")} == {
        "model": str(root / "v2"), "revision": expected["revision"]}
    assert "subfolder" not in adata.uns["cell2text"]  # a local one is in the path


def test_device_and_dtype_auto(monkeypatch):
    assert tl.resolve_device("auto").type in ("cpu", "cuda", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert tl.resolve_device("auto") == torch.device("cpu")
    assert tl.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert tl.resolve_device("auto") == torch.device("cuda")
    assert tl.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="not one of auto"):
        tl.resolve_dtype("float8", torch.device("cpu"))


def test_a_dtype_other_than_a_given_models_is_refused_not_converted_in_place(model_dirs):
    """The reviewer's finding: tl.describe(adata, model, dtype="bfloat16") converted the caller's model in place
    (the next call ran in bfloat16, its float32 weights lost to a later save)."""
    from modeling_cell2text import Cell2TextForConditionalGeneration

    model = Cell2TextForConditionalGeneration.from_pretrained(model_dirs["random"])
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dtype='bfloat16' would convert the model you passed in place"):
        describe(make_adata(2), model, dtype="bfloat16")
    assert model.dtype == torch.float32 and all(torch.equal(weights[n], t) for n, t in model.state_dict().items())
    describe(make_adata(2), model, dtype="float32")  # its own dtype: fine
    describe(make_adata(2), model_dirs["random"], dtype="bfloat16")  # a folder is loaded in that dtype


def test_free_describing_is_greedy_whatever_the_folders_generation_config(model_dirs, tmp_path):
    """The reviewer's finding: a generation_config.json with do_sample=true made tl.describe sample (two runs
    differed) while its record said generate_kwargs {} (greedy, as documented)."""
    import json
    import shutil

    folder = tmp_path / "sampling"
    shutil.copytree(model_dirs["random"], folder)
    config_file = folder / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config_file.write_text(json.dumps({**config, "do_sample": True, "temperature": 1.5}))
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        adata = make_adata(3)
        describe(adata, str(folder))
        runs.append(list(adata.obs["cell2text_description"]))
    assert runs[0] == runs[1]
    adata = make_adata(3)
    describe(adata, model_dirs["random"])
    assert list(adata.obs["cell2text_description"]) == runs[0]  # as the folder without sampling


@pytest.mark.parametrize("value", [0, 1, "false", "True"])
def test_constrained_takes_true_false_or_none_only(model_dirs, value):
    """The reviewer's finding: constrained=0 ran free (the cell_types check saw no False), "false" ran constrained."""
    with pytest.raises(ValueError, match="constrained must be True, False or None"):
        describe(make_adata(2), model_dirs["random"], constrained=value)


@pytest.mark.parametrize("generate_kwargs, message", [
    ({"generation_config": {"max_new_tokens": 3}}, "generation_config must be a transformers GenerationConfig, got "
                                                   r"dict: pass GenerationConfig\(\*\*settings\)"),
    ("max_new_tokens=3", "generate_kwargs takes a dict of generation settings, got 'max_new_tokens=3'")])
def test_generate_kwargs_of_another_type_are_refused_naming_the_fix(model_dirs, generate_kwargs, message):
    """A dict for generation_config, or a string for generate_kwargs, ended in an AttributeError from inside."""
    with pytest.raises(ValueError, match=message):
        tl.describe(make_adata(2), model_dirs["random"], progress=False, constrained=False,
                    generate_kwargs=generate_kwargs)


@pytest.mark.parametrize("generate_kwargs", [{"max_new_tokens": 3}, "config"])
def test_max_new_tokens_given_twice_is_refused(model_dirs, generate_kwargs):
    """max_new_tokens=5 beside generate_kwargs' 3 (loose or in a generation_config): the 3 ran and the 5 was dropped
    without a word, while the record said which ran."""
    from transformers import GenerationConfig

    if generate_kwargs == "config":
        generate_kwargs = {"generation_config": GenerationConfig(max_new_tokens=3)}
    with pytest.raises(ValueError, match=r"max_new_tokens is given twice, as max_new_tokens=5 and in generate_kwargs "
                                         r"\(3\): give it once"):
        tl.describe(make_adata(2), model_dirs["random"], progress=False, constrained=False, max_new_tokens=5,
                    generate_kwargs=generate_kwargs)


@pytest.mark.parametrize("option, value, message", [
    ("use_raw", "false", "use_raw must be True or False"), ("skip_empty_cells", "no", "skip_empty_cells must be"),
    ("sort_by_length", 1, "sort_by_length must be"), ("max_new_tokens", 2.5, "max_new_tokens must be an integer"),
    ("max_new_tokens", "10", "max_new_tokens must be an integer"),
    ("max_new_tokens", 0, r"max_new_tokens must be an integer >= 1")])
def test_switches_take_true_or_false_and_max_new_tokens_an_integer(model_dirs, option, value, message):
    """A bad-input hunt's finding: use_raw="false" is true, so adata.raw was read instead of X (skip_empty_cells="no"
    skipped cells); max_new_tokens=2.5 ran, "10" failed in a comparison."""
    adata = make_adata(2)
    adata.raw = make_adata(2, seed=5)
    with pytest.raises(ValueError, match=message):
        tl.describe(adata, model_dirs["random"], progress=False, constrained=False, **{option: value})
    if option != "max_new_tokens":  # the pipeline's own options too, and embed's
        with pytest.raises(ValueError, match=message):
            local_pipeline(model_dirs["random"])(adata, **{option: value})
    if option in ("use_raw", "skip_empty_cells"):
        with pytest.raises(ValueError, match=message):
            tl.embed(adata, model_dirs["random"], progress=False, **{option: value})


def test_an_adapter_folder_given_as_the_model_says_how_to_load_it(tmp_path):
    """The reviewer's finding: it said only "no config.json"."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no config.json.*this is a PEFT adapter: load its base model"):
        tl.check_model_path(tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config.json; point it at a saved Cell2Text model folder$"):
        tl.check_model_path(tmp_path / "empty")


def test_folder_code_runs_only_with_trust_remote_code(model_dirs, tmp_path, monkeypatch):
    planted = tmp_path / "planted"
    shutil.copytree(model_dirs["trained"], planted)
    marker = tmp_path / "marker"
    for code in ("modeling_cell2text.py", "configuration_cell2text.py", "processing_cell2text.py"):
        path = planted / code
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    adata = make_adata(2)
    tl.describe(adata, planted, max_new_tokens=40, progress=False)
    assert not marker.exists()
    assert (adata.obs["cell2text_description"] == DESCRIPTION).all()


def test_a_repo_id_missing_from_the_cache_offline_names_the_cache(monkeypatch, tmp_path):
    # transformers' error named preprocessor_config.json, and neither the cache nor offline mode
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"org/missing: not a local folder, and not in the Hugging Face cache .* while "
                                      r"HF_HUB_OFFLINE=1: download it first"):
        tl.describe(make_adata(2), "org/missing", progress=False)


def test_corrupted_weights_are_one_short_line(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["random"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError) as caught:
        tl.describe(make_adata(2), broken, progress=False)
    message = str(caught.value)
    assert str(broken) in message and "\n" not in message and "Traceback" not in message and len(message) < 400


def test_not_an_anndata(model_dirs):
    with pytest.raises(TypeError, match="must be an AnnData"):
        tl.describe(np.zeros((2, len(GENES))), model_dirs["random"])


def test_tl_and_cli_do_not_travel_with_a_saved_model(model_dirs):
    saved = {path.name for path in model_dirs["trained"].glob("*.py")}
    assert "modeling_cell2text.py" in saved and "pipeline_cell2text.py" in saved
    assert not saved & {"tl.py", "cli.py", "__init__.py"}
    for name in saved:  # nothing that travels imports them
        code = (model_dirs["trained"] / name).read_text()
        assert not re.search(r"^\s*(from|import)\s.*\b(tl|cli)\b", code, re.MULTILINE), name


def test_annotation_columns_types_and_skipped_cells():
    results = [
        {"description": "d0", "parsed": True, "cell_type": "B cell", "cell_type_score": 0.9, "pathways": ["P1", "P2"],
         "exact_choice": True},
        None,  # a skipped cell
        {"description": "", "parsed": False, "cell_type": None, "cell_type_score": None, "pathways": [],
         "exact_choice": False},  # the model wrote nothing: not to be told from a skipped cell before
    ]
    columns = tl.annotation_columns(results, "k")
    assert list(columns["k_description"].astype(object)) == ["d0", np.nan, ""]
    assert list(pd.Series(columns["k_description"]).isna()) == [False, True, False]
    assert list(columns["k_parsed"]) == [True, False, False]
    assert columns["k_exact_choice"].dtype == "boolean"  # a skipped cell's is missing, not False
    assert [None if v is pd.NA else bool(v) for v in columns["k_exact_choice"]] == [True, None, False]
    assert np.allclose(columns["k_cell_type_score"], [0.9, np.nan, np.nan], equal_nan=True)
    assert columns["k_cell_type_score"].dtype == np.float64
    assert list(columns["k_pathways"].astype(object)) == ["P1; P2", np.nan, np.nan]
    assert list(columns["k_cell_type"].astype(object)) == ["B cell", np.nan, np.nan]


def test_a_misspelt_option_is_named_with_the_known_ones(model_dirs):
    with pytest.raises(ValueError, match=r"Unknown describe option\(s\) \['batch_sise'\].*'batch_size'"):
        tl.describe(make_adata(2), model_dirs["random"], batch_sise=4)


@pytest.mark.parametrize("n_cells", [0, 3])
def test_no_cell_described_still_writes_the_columns(model_dirs, n_cells, tmp_path):
    """An empty AnnData (or one whose every cell is skipped) wrote the uns record and no obs column, so a notebook's
    next `adata.obs["cell2text_cell_type"]` failed with a KeyError."""
    adata = make_adata(3)[:n_cells].copy()
    adata.X = np.zeros(adata.shape, dtype=np.float32)
    describe(adata, model_dirs["trained"], skip_empty_cells=True)
    for column in FIELD_COLUMNS:
        assert f"cell2text_{column}" in adata.obs, column
    assert not adata.obs["cell2text_parsed"].any() and adata.obs["cell2text_cell_type"].isna().all()
    assert adata.obs["cell2text_description"].isna().all()  # skipped, not described as ""
    adata.write_h5ad(Path(tmp_path) / "skipped.h5ad")  # every description missing: still writable
    assert "cell2text" in adata.uns


@pytest.mark.parametrize("constrained", [True, False])
def test_no_cell_described_writes_the_columns_a_described_cell_would_have(model_dirs, constrained):
    """With every cell skipped a constrained run wrote no `_score` or `exact_choice` column, so code reading
    `adata.obs["cell2text_cell_type_score"]` worked on one batch and failed with a KeyError on another."""
    described = make_adata(2)
    describe(described, model_dirs["trained"], constrained=constrained)
    skipped = make_adata(2)
    skipped.X = np.zeros(skipped.shape, dtype=np.float32)
    describe(skipped, model_dirs["trained"], constrained=constrained, skip_empty_cells=True)
    written = sorted(c for c in described.obs if c.startswith("cell2text_"))
    assert sorted(c for c in skipped.obs if c.startswith("cell2text_")) == written
    assert ("cell2text_exact_choice" in written) == constrained
    for column in written:
        assert skipped.obs[column].dtype == described.obs[column].dtype or column.endswith(
            ("_description", "_parsed")) or isinstance(skipped.obs[column].dtype, pd.CategoricalDtype), column


def test_constrained_asked_of_a_processor_without_labels_records_and_writes_a_free_run(tmp_path):
    """constrained=True where the processor knows no cell-type labels runs free (with a warning): uns recorded
    constrained True, and with every cell skipped the columns of a constrained run were written."""
    folder = save_tiny_model_folder(tmp_path, trained=False, labels={"ontology_term_ids": {}})  # no cell type known
    model, processor = tl.load(folder, None, device="cpu", dtype="auto", trust_remote_code=False)
    described = make_adata(2)
    describe(described, model, processor=processor, constrained=True)
    skipped = make_adata(2)
    skipped.X = np.zeros(skipped.shape, dtype=np.float32)
    describe(skipped, model, processor=processor, constrained=True, skip_empty_cells=True)
    for adata in (described, skipped):
        assert adata.uns["cell2text"]["params"]["constrained"] is False
    assert sorted(c for c in skipped.obs if c.startswith("cell2text_")) == sorted(
        c for c in described.obs if c.startswith("cell2text_"))
    assert "cell2text_exact_choice" not in described.obs


# -- the uns record and key_added (reviewer's findings, stop 41) ----------------------------------------------------


def test_max_new_tokens_in_constrained_describing_says_it_has_no_effect(model_dirs, caplog):
    """The finding: `cell2text describe --max-new-tokens 3` (no --free) described every cell whole without a word,
    as the example script's option had before it was refused there; given in generate_kwargs (tl) or to the
    pipeline's call it still was. One warning, the pipeline's, whichever way it came."""
    def notices(call=None, **options) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            if call is None:
                tl.describe(make_adata(2), model_dirs["trained"], progress=False, **options)
            else:
                call(make_adata(2), **options)
        return [record.getMessage() for record in caplog.records if "max_" in record.getMessage()]

    no_effect = ("bounds free descriptions (constrained=False) only: the schema-constrained decoder writes each "
                 "description whole, so it has no effect here.")
    assert notices(max_new_tokens=3) == [f"max_new_tokens=3 {no_effect}"]
    assert notices(generate_kwargs={"max_new_tokens": 4}) == [f"max_new_tokens=4 {no_effect}"]
    assert notices() == [] and notices(max_new_tokens=40, constrained=False) == []
    describe = local_pipeline(model_dirs["trained"])
    assert notices(describe, max_new_tokens=5) == [f"max_new_tokens=5 {no_effect}"]
    assert notices(describe, generate_kwargs={"max_length": 90}) == [f"max_length=90 {no_effect}"]
    assert notices(describe) == [] and notices(describe, max_new_tokens=40, constrained=False) == []


def test_the_record_holds_the_max_new_tokens_that_ran_and_the_weights_that_ran(model_dirs):
    """The reviewer's findings: generate_kwargs' max_new_tokens ran but the record said the option's 160; the
    revision hashed the folder's files, so a model changed in memory after loading recorded the same revision."""
    from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor
    from modeling_cell2text.compatibility import processor_sha256

    adata = make_adata(2)
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dirs["random"])
    tl.describe(adata, model, constrained=False, generate_kwargs={"max_new_tokens": 2}, progress=False)
    first = adata.uns["cell2text"]
    assert first["params"]["max_new_tokens"] == 2
    assert first["function"] == "describe"
    assert first["processor_sha256"] == processor_sha256(Cell2TextProcessor.from_pretrained(model_dirs["random"]))
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    tl.describe(adata, model, constrained=False, max_new_tokens=3, progress=False)
    second = adata.uns["cell2text"]
    assert second["params"]["max_new_tokens"] == 3 and second["revision"] == first["revision"]  # the same folder
    assert second["state_dict_sha256"] != first["state_dict_sha256"]  # other weights ran
    assert len(second["state_dict_sha256"]) == 64


def test_the_folders_max_new_tokens_runs_and_is_recorded_where_none_is_given(model_dirs, tmp_path):
    """A model folder's generation_config.json length (here 2) is what free describing runs with where the caller
    sets none: 160 overrode it (a setting silently ignored), and the record read only the call's settings."""
    import json

    folder = tmp_path / "folder-length"
    shutil.copytree(model_dirs["random"], folder)
    config_file = folder / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config_file.write_text(json.dumps({**config, "max_new_tokens": 2}))
    adata = make_adata(2)
    tl.describe(adata, str(folder), constrained=False, progress=False)
    assert adata.uns["cell2text"]["params"]["max_new_tokens"] == 2
    two_tokens = local_pipeline(model_dirs["random"])(make_adata(2), constrained=False, max_new_tokens=2)
    assert list(adata.obs["cell2text_description"]) == [r["description"].replace("\x00", "\ufffd") for r in two_tokens]


def test_key_added_of_the_other_function_or_with_nul_is_refused_before_any_work(model_dirs, monkeypatch):
    """The reviewer's findings: describe and embed under one key_added replaced each other's uns record; a NUL in
    key_added failed at writing the h5ad, after every cell was described."""
    adata = make_adata(2)
    tl.embed(adata, model_dirs["random"], key_added="shared", progress=False)
    monkeypatch.setattr(tl, "load", lambda *a, **k: pytest.fail("the refusal comes before loading the model"))
    with pytest.raises(ValueError, match=r"uns\['shared'\] records a run of embed.*Pass another key_added"):
        describe(adata, model_dirs["random"], key_added="shared")
    with pytest.raises(ValueError, match="without '/' or NUL"):
        describe(adata, model_dirs["random"], key_added="a\x00b")
    monkeypatch.undo()
    describe(adata, model_dirs["random"], key_added="mine")
    with pytest.raises(ValueError, match=r"uns\['mine'\] records a run of describe"):
        tl.embed(adata, model_dirs["random"], key_added="mine", progress=False)
    describe(adata, model_dirs["random"], key_added="mine")  # describing again under its own key is fine


def test_key_added_naming_another_tools_results_is_refused(model_dirs, monkeypatch):
    """The reviewer's finding: key_added="neighbors" replaced scanpy's graph record (sc.tl.umap then failed); an
    obsm entry or obs columns without a Cell2Text record were replaced the same way."""
    adata = make_adata(2)
    adata.uns["neighbors"] = {"params": {"method": "umap"}}
    adata.obsm["X_pca"] = np.zeros((2, 3))
    adata.obs["mine_cell_type"] = ["a", "b"]
    monkeypatch.setattr(tl, "load", lambda *a, **k: pytest.fail("the refusal comes before loading the model"))
    for function, key, held in ((describe, "neighbors", r"adata\.uns\['neighbors'\]"),
                                (tl.embed, "X_pca", r"adata\.obsm\['X_pca'\]"),
                                (describe, "mine", r"adata\.obs\['mine_cell_type'\]")):
        with pytest.raises(ValueError, match=held + r" holds results without a Cell2Text record in adata\.uns"):
            function(adata, model_dirs["random"], key_added=key)
    assert adata.uns["neighbors"] == {"params": {"method": "umap"}} and not adata.obsm["X_pca"].any()


def test_gene_ids_naming_var_in_another_order_are_refused(model_dirs):
    """The reviewer's finding: gene_ids given with an AnnData were taken in any order (as a DataFrame's were),
    so the values of one gene were read as another's."""
    adata = make_adata(2)
    adata.var["symbol"] = [f"S{i}" for i in range(adata.n_vars)]
    describe_pipeline = local_pipeline(model_dirs["random"])
    expected = [r["description"] for r in describe_pipeline(adata, constrained=False, max_new_tokens=4)]
    same = describe_pipeline(adata, GENES, constrained=False, max_new_tokens=4)  # var's own order: taken
    assert [r["description"] for r in same] == expected
    for reordered, column in ((GENES[::-1], "index"), (list(adata.var["symbol"])[::-1], "symbol")):
        with pytest.raises(ValueError, match=rf"adata\.var \({column}\) in another order"):
            describe_pipeline(adata, reordered, constrained=False, max_new_tokens=4)
    # the same genes named as match_genes reads them (versioned, lower case): they were taken in any order
    for renamed in ([g + ".1" for g in GENES[::-1]], [g.lower() for g in GENES[::-1]]):
        with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
            describe_pipeline(adata, renamed, constrained=False, max_new_tokens=4)
    versioned = describe_pipeline(adata, [g + ".7" for g in GENES], constrained=False, max_new_tokens=4)
    assert [r["description"] for r in versioned] == expected
    adata.var["alias"] = GENES[::-1]  # another column naming the genes in another order: var's own order is taken
    assert [r["description"] for r in describe_pipeline(adata, GENES, constrained=False, max_new_tokens=4)] == expected
    adata.raw = adata
    with pytest.raises(ValueError, match=r"adata\.raw\.var \(index\) in another order"):
        describe_pipeline(adata, GENES[1:] + GENES[:1], use_raw=True, constrained=False, max_new_tokens=4)


def test_symbols_naming_a_var_of_ensembl_ids_in_another_order_are_refused():
    import pandas as pd

    from modeling_cell2text.cell_inputs import check_gene_ids_in_var_order

    var = pd.DataFrame(index=["ENSG00000010610", "ENSG00000153563", "ENSG00000177455"])
    symbols = {"CD4": "ENSG00000010610", "CD8A": "ENSG00000153563", "CD19": "ENSG00000177455"}
    check_gene_ids_in_var_order(["CD4", "CD8A", "CD19"], var, "adata.var", symbols)  # var's order: taken
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(["CD8A", "CD4", "CD19"], var, "adata.var", symbols)
    # one gene without a mapping (the second reader's finding: it let the whole reordered list through)
    var = pd.DataFrame(index=["ENSG00000010610", "ENSG00000153563", "ENSG00000177455", "ENSG00000230368"])
    check_gene_ids_in_var_order(["CD4", "CD8A", "CD19", "FAM41C"], var, "adata.var", symbols)
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(["CD8A", "CD4", "CD19", "FAM41C"], var, "adata.var", symbols)
    var["feature_type"] = ["Gene Expression"] * 4  # a text column naming no gene: not a naming of them
    check_gene_ids_in_var_order(["CD4", "CD8A", "CD19", "FAM41C"], var, "adata.var", symbols)
    # the third reader's findings: a column with gaps at the moved genes agreed with the reordered list, and a
    # vocabulary naming under half of var's genes (symbols of the others unmapped) turned the check off
    var["feature_name"] = [None, None, "CD19", "FAM41C"]
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(["CD8A", "CD4", "CD19", "FAM41C"], var, "adata.var", symbols)
    ids = [f"ENSG{i:011d}" for i in range(1, 11)]
    var = pd.DataFrame(index=ids)
    few = {f"S{i}": ids[i] for i in range(4)}  # 4 of 10 genes in the vocabulary
    names = [f"S{i}" for i in range(10)]
    check_gene_ids_in_var_order(names, var, "adata.var", few)
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(names[::-1], var, "adata.var", few)
    # the fourth reader's: Ensembl ids given for a var of symbols, a vocabulary naming under half of them
    symbol_var = pd.DataFrame(index=names)
    check_gene_ids_in_var_order(ids, symbol_var, "adata.var", few)
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(ids[1:2] + ids[:1] + ids[2:], symbol_var, "adata.var", few)
    # exactly half of the given vocabulary genes placed by var, two of them swapped: "at least half" refuses it
    half_var = pd.DataFrame(index=[ids[1], ids[0], ids[8], ids[9]])
    with pytest.raises(ValueError, match=r"adata\.var \(index\) in another order"):
        check_gene_ids_in_var_order(["S0", "S1", "S2", "S3"], half_var, "adata.var", few)
    # 10x features: a symbol given twice, var's index made unique; in var's order, taken
    tenx = pd.DataFrame({"gene_ids": ids}, index=names[:8] + ["Y_RNA", "Y_RNA-1"])
    check_gene_ids_in_var_order(names[:8] + ["Y_RNA", "Y_RNA"], tenx, "adata.var", few)


def test_gene_ids_naming_other_genes_than_var_are_refused():
    """A bad-input hunt's finding: gene_ids of another dataset (as many genes, few of them var's) were taken, since
    no shared gene stood at another position: the values of var's genes were read as those other genes'."""
    import pandas as pd

    from modeling_cell2text.cell_inputs import check_gene_ids_in_var_order

    ids = [f"ENSG{i:011d}" for i in range(1, 21)]
    symbols = {f"S{i}": gene for i, gene in enumerate(ids)}
    var = pd.DataFrame(index=ids[:10])
    with pytest.raises(ValueError, match=r"other genes than adata\.var \(index\) at 10 of the 10 positions"):
        check_gene_ids_in_var_order(ids[10:], var, "adata.var", symbols)
    with pytest.raises(ValueError, match=r"other genes than adata\.var \(index\) at 7 of the 10 positions"):
        check_gene_ids_in_var_order(ids[:3] + ids[13:], var, "adata.var", symbols)  # 3 shared, in place
    check_gene_ids_in_var_order(ids[:8] + ids[18:], var, "adata.var", symbols)  # correcting a few names: taken
    mouse = pd.DataFrame(index=[f"ENSMUSG{i:011d}" for i in range(10)])  # var's genes not the model's: orthologs
    check_gene_ids_in_var_order(ids[10:], mouse, "adata.var", symbols)
    unnamed = pd.DataFrame(index=[str(i) for i in range(10)])  # var names no gene
    check_gene_ids_in_var_order(ids[10:], unnamed, "adata.var", symbols)
    var["feature_name"] = [f"S{i}" for i in range(10, 20)]  # a naming that agrees with them: taken
    check_gene_ids_in_var_order(ids[10:], var, "adata.var", symbols)


def test_cell_types_narrow_the_labels_of_this_call_only(tmp_path):
    from test_pipeline import ONTOLOGY_IDS

    cell_types = {"B cell": "CL:0000236", "T cell": "CL:0000084", "monocyte": "CL:0000576"}
    folder = save_tiny_model_folder(tmp_path, trained=False,
                                    labels={"ontology_term_ids": {**ONTOLOGY_IDS, "cell_type": cell_types}})
    model, processor = tl.load(folder, None, device="cpu", dtype="auto", trust_remote_code=False)
    everything, narrowed = make_adata(4), make_adata(4)
    tl.describe(everything, model, processor=processor, progress=False)
    tl.describe(narrowed, model, processor=processor, cell_types=("monocyte",), progress=False)
    assert set(narrowed.obs["cell2text_cell_type"]) == {"monocyte"}
    assert set(narrowed.obs["cell2text_cell_type_ontology_term_id"]) == {"CL:0000576"}
    assert (narrowed.obs["cell2text_cell_type_score"] == 1.0).all()  # the only option
    assert processor.ontology_term_ids["cell_type"] == cell_types  # the caller's processor is unchanged
    records = [adata.uns["cell2text"]["params"] for adata in (everything, narrowed)]
    assert "cell_types" not in records[0] and records[1]["cell_types"] == ["monocyte"]
    assert records[0]["label_tables_sha256"] != records[1]["label_tables_sha256"]
    with pytest.raises(ValueError, match="cell_types chooses the cell type among labels"):
        tl.describe(make_adata(2), model, processor=processor, cell_types=["monocyte"], constrained=False)
    # the second reader's findings: what ran is what is recorded, and a bad value names cell_types
    once = make_adata(2)
    tl.describe(once, model, processor=processor, cell_types=(label for label in ["monocyte", "monocyte"]),
                progress=False)
    assert once.uns["cell2text"]["params"]["cell_types"] == ["monocyte"]  # a generator, used once; duplicates once
    for value, message in (("monocyte", "cell_types takes a list"), ([], "cell_types is empty")):
        with pytest.raises(ValueError, match=message):
            tl.describe(make_adata(2), model, processor=processor, cell_types=value)


def test_embed_skipping_empty_cells_puts_each_embedding_on_its_own_row(tmp_path):
    """`tl.embed(..., skip_empty_cells=True)`: a skipped cell's row is NaN and every other cell's row is its own
    embedding (as when the empty cells are not there at all), not shifted onto the skipped cell's row."""
    folder = save_tiny_model_folder(tmp_path, trained=False)
    adata = make_adata(5, seed=2)
    adata.X = adata.X.toarray()
    adata.X[[1, 3]] = 0  # cells 1 and 3 express no gene
    kept = adata[[0, 2, 4]].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tl.embed(adata, folder, batch_size=2, skip_empty_cells=True, progress=False)
        tl.embed(kept, folder, batch_size=2, progress=False)
    embeddings = adata.obsm["X_cell2text"]
    assert np.isnan(embeddings[[1, 3]]).all()
    assert np.allclose(embeddings[[0, 2, 4]], kept.obsm["X_cell2text"], atol=1e-6)


def test_a_folder_saved_with_a_pathway_name_holding_the_separator_loads_and_only_tl_describe_refuses(tmp_path):
    """A folder saved before pathway names holding "; " were refused no longer loaded at all (its processor's tables
    were refused), though only tl.describe's obs column, which joins a cell's pathways with "; ", is ambiguous. It
    loads and describes through the pipeline; tl.describe refuses its names naming the fix, and describes once the
    other pathways are kept; a name the model writes freely holding "; " is refused where the column is written."""
    import json
    from types import SimpleNamespace

    from modeling_cell2text.compatibility import label_tables_sha256

    folder = save_tiny_model_folder(tmp_path, trained=False, labels={"pathway_names": ["Glycolysis, TCA", "Hypoxia"]})
    # as saved before the refusal: the name and the labels checksum recorded with it
    processor_file, config_file = folder / "processor_config.json", folder / "config.json"
    settings = json.loads(processor_file.read_text())
    settings["pathway_names"] = ["Glycolysis; TCA", "Hypoxia"]
    processor_file.write_text(json.dumps(settings))
    config = json.loads(config_file.read_text())
    config["processor_sha256"]["labels"] = label_tables_sha256(SimpleNamespace(**{
        name: settings.get(name) or empty for name, empty in (("ontology_term_ids", {}),
                                                               ("cell_type_definitions", {}),
                                                               ("pathway_names", []), ("age_groups", []))}))
    config_file.write_text(json.dumps(config))

    processor = Cell2TextProcessor.from_pretrained(folder)
    assert processor.pathway_names == ["Glycolysis; TCA", "Hypoxia"]
    assert len(local_pipeline(folder)(make_adata(2))) == 2
    # before any cell is described (not where a described cell's pathways are joined, after the whole run)
    with pytest.raises(ValueError, match=r"processor's pathway names \['Glycolysis; TCA'\] hold .*keep_labels\(pathways="):
        tl.describe(make_adata(2), str(folder), progress=False)
    processor.keep_labels(pathways=["Hypoxia"])
    adata = make_adata(2)
    tl.describe(adata, str(folder), processor=processor, progress=False)
    assert set(adata.obs["cell2text_pathways"].dropna()) <= {"Hypoxia"}
    with pytest.raises(ValueError, match=r"pathway names the model wrote \['A; B'\]"):
        tl.annotation_columns([{"pathways": ["A; B"]}, {"pathways": []}], "cell2text")
