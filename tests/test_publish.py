"""Publishing checks a model folder before upload and uploads it whole (the Hub client is faked: no network)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tiny_parts import save_tiny_parts
from transformers import AutoTokenizer

from modeling_cell2text import (
    Cell2TextFeatureExtractor,
    Cell2TextForConditionalGeneration,
    Cell2TextProcessor,
    save_model_folder,
)
from hub_cards.publish import check_hub_ready, publish_model


class FakeHub:
    def __init__(self, existing_public: bool = False):
        self.calls = []
        self.existing_public = existing_public

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(private=not self.existing_public)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def corpus_folder(folder, summary=None):
    """The files of a built corpus that publishing reads or uploads beside its splits."""
    (folder / "feature_extractor").mkdir(parents=True)
    for name in ("dataset_dict.json", "feature_extractor/preprocessor_config.json", "unmapped_genes.txt"):
        (folder / name).write_text("{}" if name.endswith(".json") else "")
    (folder / "rejects.csv").write_text("cell_id,reason\n")
    (folder / "summary.json").write_text(json.dumps(summary or {}))
    return folder


@pytest.fixture()
def model_dir(tmp_path):
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    genes = {f"ENSG{i:011d}": 1.0 for i in range(1, 61)}  # the tiny encoder embeds 60 genes + 4 special tokens
    processor = Cell2TextProcessor(Cell2TextFeatureExtractor.from_gene_medians(genes),
                                   AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    out = tmp_path / "model"
    save_model_folder(model, processor, out)
    return out


def test_a_saved_model_folder_is_hub_ready_and_uploads_whole(model_dir):
    check_hub_ready(model_dir)
    hub = FakeHub()
    url = publish_model(model_dir, "org/cell2text-tiny", api=hub)
    assert url.endswith("org/cell2text-tiny")
    (_, _, create), (_, repo, upload) = hub.calls
    assert repo == "org/cell2text-tiny" and upload["folder_path"] == str(model_dir)
    # weights of an earlier upload in the other layout (whole, sharded) are deleted with it (a second reader's
    # finding: the repo then held both, and from_pretrained refused it)
    assert {"model*.safetensors", "model.safetensors.index*.json"} <= set(upload["delete_patterns"])



def test_a_sharded_save_with_an_earlier_saves_files_is_not_refused_as_stray(model_dir, tmp_path):
    """What a real save writes passes the stray-file check: sharded weights and their index, and the tokenizer files
    of an earlier transformers that loading still reads (`EARLIER_SAVE_FILES`, checked for reading back)."""
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dir)
    sharded = tmp_path / "sharded"
    save_model_folder(model, Cell2TextProcessor.from_pretrained(model_dir), sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    (sharded / "special_tokens_map.json").write_text("{}")
    check_hub_ready(sharded)


def test_a_folder_whose_tokenizer_is_a_gpt2_tokenizer_is_not_refused_as_stray(model_dir, tmp_path):
    """GPT2Tokenizer (the tokenizer class of SmolLM2 on the Hub, OPT, ...) names vocab.json and merges.txt as its
    files but saves tokenizer.json: the folder was refused with "move them out" of the tokenizer loading reads."""
    from transformers import GPT2Tokenizer

    processor = Cell2TextProcessor.from_pretrained(model_dir)
    processor.tokenizer = GPT2Tokenizer.from_pretrained(model_dir)
    saved = tmp_path / "gpt2"
    save_model_folder(Cell2TextForConditionalGeneration.from_pretrained(model_dir), processor, saved)
    assert "tokenizer.json" not in type(Cell2TextProcessor.from_pretrained(saved).tokenizer).vocab_files_names.values()
    check_hub_ready(saved)

def test_an_earlier_uploads_tokenizer_and_template_files_are_deleted_with_a_new_upload(model_dir):
    """An earlier save's chat_template.json (special_tokens_map.json, added_tokens.json) stayed in the repo beside
    the new upload, and transformers reads it beside the new files: every user's load of the processor was refused
    as another processor's. What the repo holds but loading does not read (a licence someone added) stays."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    hub = FakeHub()
    publish_model(model_dir, "org/x", api=hub)
    delete_patterns = hub.calls[-1][2]["delete_patterns"]
    in_repo = ["chat_template.json", "special_tokens_map.json", "added_tokens.json",
               "additional_chat_templates/t.jinja", "model-00001-of-00002.safetensors", "LICENSE", "notes.md",
               ".gitattributes"]
    assert sorted(filter_repo_objects(in_repo, allow_patterns=delete_patterns)) == [
        "added_tokens.json", "additional_chat_templates/t.jinja", "chat_template.json",
        "model-00001-of-00002.safetensors", "special_tokens_map.json"]
    # what loading reads of the repo after the upload: the new files and a stale template, refused
    stale = model_dir.parent / "repo"
    shutil.copytree(model_dir, stale)
    (stale / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }} OLD"}))
    with pytest.raises(ValueError, match="does not fit the model"):
        Cell2TextProcessor.from_pretrained(stale)


def test_a_folder_without_the_processor_is_refused(model_dir):
    (model_dir / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        publish_model(model_dir, "org/x", api=FakeHub())


@pytest.mark.parametrize("module", ["modeling_cell2text.py", "rank_value.py", "text_padding.py"])
def test_a_folder_missing_a_code_file_its_auto_map_reaches_is_refused(model_dir, module):
    from hub_cards.publish import _remote_code_files

    config = __import__("json").loads((model_dir / "config.json").read_text())
    assert {"modeling_cell2text.py", "processing_cell2text.py", "pipeline_cell2text.py", "rank_value.py",
            "description_schema.py"} <= set(_remote_code_files(model_dir, config))
    (model_dir / module).unlink()
    with pytest.raises(FileNotFoundError, match=module):
        check_hub_ready(model_dir)


def test_publishing_re_renders_the_card_for_the_target_repo(model_dir):
    from hub_cards.render import save_model_card

    save_model_card(model_dir, {"split": "test", "num_cells": 8, "fields": {"cell_type": {"accuracy": 0.5}}},
                    repo_id="demo-org/cell2text-demo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    encoder=str(model_dir / "encoder"), dataset_id="demo-org/corpus", training_config={})
    hub = FakeHub()
    publish_model(model_dir, "org/cell2text-tiny", api=hub)
    card = (model_dir / "README.md").read_text()
    assert 'model="org/cell2text-tiny"' in card and "demo-org/cell2text-demo" not in card
    assert "model_card_inputs.json" in hub.calls[1][2]["ignore_patterns"]


def test_a_folder_whose_weights_do_not_match_its_config_is_refused_before_upload(model_dir):
    """The QA finding: the publish check looked at file names only; a folder missing a tensor passed."""
    from safetensors.torch import load_file
    from tiny_parts import rewrite_weights

    tensors = load_file(model_dir / "model.safetensors")
    tensors.pop("model.multi_modal_projector.linear_1.weight")
    rewrite_weights(model_dir / "model.safetensors", tensors)
    hub = FakeHub()
    with pytest.raises(OSError, match="missing from the weights file"):
        publish_model(model_dir, "org/x", api=hub)
    assert hub.calls == []


def test_a_processor_that_does_not_fit_the_model_is_refused_before_upload(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_cell_tokens": 4}))
    with pytest.raises(ValueError, match="cell tokens per cell: processor 8, model 4"):
        check_hub_ready(model_dir)


@pytest.mark.parametrize("name", ["adapter_config.json", "pytorch_model.bin"])
def test_adapter_or_pickle_files_in_the_folder_are_refused_before_upload(model_dir, name):
    (model_dir / name).write_text("{}")
    with pytest.raises(ValueError, match=f"holds \\['{name}'\\] beside its merged weights"):
        check_hub_ready(model_dir)


@pytest.mark.parametrize("stray", ["model-old.safetensors", "pytorch_model-00001-of-00002.bin", "scratch.py",
                                   ".ipynb_checkpoints/config-checkpoint.json", "notes/run.txt"])
def test_files_no_cell2text_folder_is_made_of_are_refused_by_name_before_upload(model_dir, stray, monkeypatch):
    """The whole folder was uploaded: a stray copy of the weights, a script or a notebook's checkpoints went to the
    Hub with the model. Only huggingface_hub's own ignored folders (.git/) and the files not uploaded may be there.
    Refused before the model is loaded (minutes for a large one)."""
    (model_dir / stray).parent.mkdir(exist_ok=True)
    (model_dir / stray).write_text("{}")
    hub = FakeHub()
    with monkeypatch.context() as patch:
        patch.setattr(Cell2TextForConditionalGeneration, "from_pretrained",
                      lambda *args, **kwargs: pytest.fail("the model was loaded before the stray file was refused"))
        with pytest.raises(ValueError, match=rf"holds \['{stray}'\], which are no part of a Cell2Text model "
                                             "folder.*move them out"):
            publish_model(model_dir, "org/x", api=hub)
    assert hub.calls == []
    (model_dir / stray).unlink()
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "config").write_text("[core]\n")  # a clone of the repo: huggingface_hub skips .git/
    (model_dir / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")  # was refused
    (model_dir / "training_state.json").write_text("{}")
    publish_model(model_dir, "org/x", api=hub)
    assert ".gitattributes" in hub.calls[-1][2]["ignore_patterns"]  # the repo keeps its own


def test_a_corpus_whose_feature_extractor_folder_holds_other_files_is_refused_before_anything_is_made(
        model_dir, tmp_path):
    """The corpus's feature_extractor folder is uploaded whole, so the same check applies to it."""
    from hub_cards.publish import check_corpus_files

    corpus = corpus_folder(tmp_path / "corpus")
    Cell2TextProcessor.from_pretrained(model_dir).feature_extractor.save_pretrained(corpus / "feature_extractor")
    check_corpus_files(corpus)
    (corpus / "feature_extractor" / "medians-old.json").write_text("{}")
    hub = FakeHub()
    with pytest.raises(ValueError, match=r"holds \['medians-old.json'\], which are no part of a saved feature"):
        publish_model(model_dir, "org/x", api=hub, dataset_id="org/x-corpus", corpus_dir=corpus)
    assert hub.calls == []


@pytest.mark.parametrize("name", ["summary.json", "rejects.csv", "unmapped_genes.txt",
                                  "feature_extractor/preprocessor_config.json"])
def test_a_corpus_lacking_a_file_publishing_uploads_is_refused_before_anything_is_made(model_dir, tmp_path, name):
    """The corpus's files were read only after the model was uploaded and the splits pushed: a corpus without its
    rejects.csv left a dataset repo without the build's files, and the command ended with a FileNotFoundError."""
    corpus = corpus_folder(tmp_path / "corpus")
    (corpus / name).unlink()
    hub = FakeHub()
    with pytest.raises(FileNotFoundError, match=rf"lacks \['{name}'\], which publishing uploads"):
        publish_model(model_dir, "org/x", api=hub, dataset_id="org/x-corpus", corpus_dir=corpus)
    assert hub.calls == []


@pytest.mark.parametrize("name, content, message", [
    ("summary.json", b"{oops", "summary.json is not a corpus summary as .*: not JSON"),
    ("summary.json", b"[]", r"summary.json is not a corpus summary as .*: it is \[\], not a JSON object"),
    ("rejects.csv", b"a,b\n", r"rejects.csv is not the rejected cells as .*: its columns are \['a', 'b'\]"),
    ("rejects.csv", b"", r"rejects.csv is not the rejected cells as .*: not CSV"),
    ("unmapped_genes.txt", b"\x89PNG\r\n\x1a\n\xff", r"unmapped_genes.txt is not the unmapped genes as .*: not UTF-8"),
])
def test_a_corpus_with_a_corrupt_file_is_refused_before_anything_is_made(model_dir, tmp_path, name, content,
                                                                         message):
    """A corrupt summary.json ended publishing in a JSONDecodeError or AttributeError; a corrupt rejects.csv or
    unmapped_genes.txt was uploaded as it was, after the model."""
    corpus = corpus_folder(tmp_path / "corpus")
    (corpus / name).write_bytes(content)
    hub = FakeHub()
    with pytest.raises(ValueError, match=message):
        publish_model(model_dir, "org/x", api=hub, dataset_id="org/x-corpus", corpus_dir=corpus)
    assert hub.calls == []


@pytest.mark.parametrize("name", ["config.json", "processor_config.json", "tokenizer_config.json",
                                  "evaluation_results.json"])
@pytest.mark.parametrize("content, problem", [(b"{oops", r"does not parse \(Expecting"),
                                              (b"[1]", "holds a JSON list, not an object")])
def test_a_model_folder_json_file_that_is_corrupt_is_refused_naming_it(model_dir, name, content, problem):
    """publish ended in a JSONDecodeError or an AttributeError ('list' object has no attribute 'get')."""
    (model_dir / name).write_bytes(content)
    hub = FakeHub()
    with pytest.raises(ValueError, match=f"^{model_dir / name} {problem}.*: restore the file, or save the model "
                                         "folder again"):
        publish_model(model_dir, "org/x", api=hub)
    assert hub.calls == []


def test_private_is_refused_for_an_existing_public_repo_before_anything_is_made_or_written(model_dir, tmp_path,
                                                                                           monkeypatch):
    # the second reader's finding: the card was re-rendered for the repo, then --private was refused
    from hub_cards import publish
    from hub_cards.render import save_model_card

    save_model_card(model_dir, {"split": "test", "num_cells": 8, "fields": {}}, repo_id="org/old", base_model="b",
                    encoder="e", dataset_id="org/old-corpus", training_config={})
    card = (model_dir / "README.md").read_text()
    hub = FakeHub(existing_public=True)
    with pytest.raises(ValueError, match="exists and is public"):
        publish_model(model_dir, "org/x", private=True, api=hub)
    assert hub.calls == [] and (model_dir / "README.md").read_text() == card
    corpus = corpus_folder(tmp_path / "corpus")
    monkeypatch.setattr(publish, "HfApi", lambda: hub)
    with pytest.raises(SystemExit, match="exists and is public"):
        publish.main(["--model", str(model_dir), "--repo", "org/x", "--private", "--corpus", str(corpus),
                      "--dataset-repo", "org/x-corpus"])
    assert hub.calls == [] and (model_dir / "README.md").read_text() == card


def test_code_files_that_differ_from_the_installed_package_are_refused_unless_refreshed(model_dir):
    """A user without the package runs the folder's code; the check loads the package's: they must be the same."""
    from hub_cards.publish import PACKAGE_CODE_DIR

    with (model_dir / "rank_value.py").open("a") as code:
        code.write("\nfrom .gene_ids import a_function_removed_later  # noqa\n")
    with pytest.raises(ValueError, match=r"rank_value.py.*--refresh-code"):
        publish_model(model_dir, "org/x", api=FakeHub())
    publish_model(model_dir, "org/x", api=FakeHub(), refresh_code=True)
    assert (model_dir / "rank_value.py").read_bytes() == (PACKAGE_CODE_DIR / "rank_value.py").read_bytes()


@pytest.mark.parametrize(("entry", "reference"), [
    ("auto_map", "my_modeling.Cell2TextForConditionalGeneration"),  # an edited copy under another name
    ("custom_pipelines", "my_pipeline.Cell2TextPipeline"),
    ("auto_map", "modeling_cell2text.Cell2TextForConditionalGenration"),  # misspelt: fails on the user's load
])
def test_code_references_to_modules_or_classes_the_package_lacks_are_refused(model_dir, entry, reference):
    """Only files the package also has were compared, so a folder whose auto_map named its own renamed copy of the
    code passed the check (which loads the installed classes) and a user with trust_remote_code ran the copy."""
    config = json.loads((model_dir / "config.json").read_text())
    module = reference.split(".")[0]
    if module.startswith("my_"):
        original = "pipeline_cell2text.py" if entry == "custom_pipelines" else "modeling_cell2text.py"
        (model_dir / f"{module}.py").write_text((model_dir / original).read_text() + "\n# edited\n")
    if entry == "auto_map":
        config["auto_map"]["AutoModelForCausalLM"] = reference
    else:
        config["custom_pipelines"]["cell-to-text"]["impl"] = reference
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{reference}.*no classes of the installed Cell2Text"):
        check_hub_ready(model_dir)


def test_a_card_evaluating_a_model_with_another_gene_vocabulary_is_refused(model_dir):
    from hub_cards.render import save_model_card

    save_model_card(model_dir, {"split": "test", "num_cells": 8, "gene_vocabulary_sha256": "0" * 64,
                                "fields": {"cell_type": {"accuracy": 0.97}}},
                    repo_id="org/old", base_model="b", encoder="e", dataset_id="org/old-corpus", training_config={})
    card = (model_dir / "README.md").read_text()
    hub = FakeHub()
    # the fix renders the card again: evaluating alone (the fix it named) writes neither card nor evaluation_results
    with pytest.raises(ValueError, match="another gene vocabulary.*training.evaluation.evaluate, then "
                       "hub_cards.render.save_model_card"):
        publish_model(model_dir, "org/x", api=hub)
    assert (model_dir / "README.md").read_text() == card and hub.calls == []  # was re-rendered for org/x
    config = json.loads((model_dir / "config.json").read_text())
    results = json.loads((model_dir / "evaluation_results.json").read_text())
    results["gene_vocabulary_sha256"] = config["gene_vocabulary_sha256"]  # this model's evaluation
    (model_dir / "evaluation_results.json").write_text(json.dumps(results))
    publish_model(model_dir, "org/x", api=FakeHub())


def test_the_card_names_the_corpus_published_with_the_model(model_dir):
    from hub_cards.render import save_model_card

    save_model_card(model_dir, {"split": "test", "num_cells": 8, "fields": {"cell_type": {"accuracy": 0.5}}},
                    repo_id="org/old", base_model="b", encoder="e", dataset_id="pbmc68k_reduced (scanpy)",
                    training_config={})
    publish_model(model_dir, "org/x", api=FakeHub(), dataset_id="org/x-corpus")
    card = (model_dir / "README.md").read_text()
    assert "datasets:\n- org/x-corpus" in card and "https://huggingface.co/datasets/org/x-corpus" in card


def test_a_corpus_of_another_build_is_refused_with_the_model(model_dir, tmp_path):
    from hub_cards.publish import check_corpus_is_the_models

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "training_corpus_fingerprints": {"train": "a"}}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "summary.json").write_text(json.dumps({"fingerprints": {"train": "b"}}))
    with pytest.raises(ValueError, match="another corpus build"):
        check_corpus_is_the_models(model_dir, corpus)
    (corpus / "summary.json").write_text(json.dumps({"fingerprints": {"train": "a"}}))
    check_corpus_is_the_models(model_dir, corpus)


def test_no_path_of_the_building_machine_is_uploaded(model_dir):
    """The sub-configs named the folders the parts were loaded from; the saved evaluation its model and corpus."""
    from hub_cards.render import save_model_card

    config = json.loads((model_dir / "config.json").read_text())
    assert "_name_or_path" not in config["text_config"] and "_name_or_path" not in config["gene_encoder_config"]
    save_model_card(model_dir, {"split": "test", "num_cells": 8, "model": str(model_dir), "dataset": "/data/corpus",
                                "fields": {"cell_type": {"labels": ["T/NK cell"]}}},
                    repo_id="org/x", base_model="b", encoder="e", dataset_id="org/x-corpus", training_config={})
    results = json.loads((model_dir / "evaluation_results.json").read_text())
    assert (results["model"], results["dataset"]) == ("model", "corpus")
    assert results["fields"]["cell_type"]["labels"] == ["T/NK cell"]
    assert str(model_dir.parent) not in (model_dir / "config.json").read_text()


def test_the_card_says_which_fields_the_model_writes():
    """A model evaluated on cell type, tissue and disease (its corpus had no sex or age-group labels) is not
    introduced as writing sex and developmental stage."""
    from hub_cards.render import render_model_card

    def introduction(results):
        card = render_model_card(results, repo_id="org/x", base_model="b", encoder="e", dataset_id="d",
                                 training_config={}).text
        return " ".join(card.split("writes a short description")[1].split("The structured")[0].split())

    three = {"fields": {name: {"accuracy": 0.5} for name in ("cell_type", "tissue", "disease")}}
    assert introduction(three) == "of the cell: its cell type, tissue, disease state and active pathways."
    assert "sex, developmental stage and active pathways" in introduction({})


def test_a_card_evaluating_other_weights_is_refused(model_dir):
    """The saved evaluation records a checksum of the weights it evaluated: a folder whose weights were replaced
    after (same gene vocabulary, so the vocabulary check passes) does not publish the old figures."""
    from safetensors.torch import load_file, save_file

    from hub_cards.render import save_model_card
    from modeling_cell2text.tl import weights_sha256

    config = json.loads((model_dir / "config.json").read_text())
    save_model_card(model_dir, {"split": "test", "num_cells": 8, "gene_vocabulary_sha256": config["gene_vocabulary_sha256"],
                                "weights_sha256": weights_sha256(model_dir),
                                "fields": {"cell_type": {"accuracy": 0.97}}},
                    repo_id="org/old", base_model="b", encoder="e", dataset_id="org/corpus", training_config={})
    publish_model(model_dir, "org/x", api=FakeHub())
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.multi_modal_projector.linear_1.weight"] += 1.0  # another training run's weights
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="other weights"):
        publish_model(model_dir, "org/x", api=FakeHub())


def test_a_card_measured_with_other_code_is_refused(model_dir):
    """The reviewer's finding: after --refresh-code the card kept figures that an earlier version's code measured,
    and nothing recorded which code they came from."""
    from hub_cards.publish import code_sha256
    from hub_cards.render import save_model_card
    from training.evaluation.evaluate import evaluated_code_sha256

    def card_measured_with(code):
        save_model_card(model_dir, {"split": "test", "num_cells": 8, "code_sha256": code, "fields": {}},
                        repo_id="org/old", base_model="b", encoder="e", dataset_id="org/corpus", training_config={})

    assert evaluated_code_sha256(model_dir, False) == evaluated_code_sha256(model_dir, True) == code_sha256(model_dir)
    card_measured_with(evaluated_code_sha256(model_dir, False))
    publish_model(model_dir, "org/x", api=FakeHub())
    # A folder of an earlier version, evaluated with its own model code (trust_remote_code): refreshed, its card's
    # figures are of other code than it then ships
    modeling = model_dir / "modeling_cell2text.py"
    modeling.write_text(modeling.read_text() + "\n# an earlier version\n")
    card_measured_with(evaluated_code_sha256(model_dir, True))
    with pytest.raises(ValueError, match="measured with other model code than the folder holds"):
        publish_model(model_dir, "org/x", api=FakeHub(), refresh_code=True)
    # The second reader's finding: evaluation decodes with the installed decoder even with trust_remote_code, so an
    # earlier decoder in the folder did not make the figures (they were refused after --refresh-code)
    decoder = model_dir / "schema_decoding.py"
    decoder.write_text(decoder.read_text() + "\n# an earlier version\n")
    card_measured_with(evaluated_code_sha256(model_dir, True))
    publish_model(model_dir, "org/x", api=FakeHub(), refresh_code=True)


def test_refreshing_an_old_folders_code_copies_the_modules_it_now_imports(model_dir):
    """The reviewer's finding: --refresh-code copied only files the folder had, so a folder saved before a module
    existed (text_padding.py) was left needing it: refused, and broken for remote loading."""
    from hub_cards.publish import PACKAGE_CODE_DIR

    (model_dir / "text_padding.py").unlink()
    for path in model_dir.glob("*.py"):  # as saved before they imported it
        path.write_text(path.read_text().replace("from .text_padding import", "from .rank_value import"))
    with pytest.raises(ValueError, match="--refresh-code"):
        check_hub_ready(model_dir)
    publish_model(model_dir, "org/x", api=FakeHub(), refresh_code=True)
    assert (model_dir / "text_padding.py").read_bytes() == (PACKAGE_CODE_DIR / "text_padding.py").read_bytes()


def test_paths_of_this_machine_in_uploaded_files_are_refused_unless_refreshed(model_dir):
    """The reviewer's finding: a folder saved by an earlier version kept the parts' folders in config.json and
    absolute paths in its saved evaluation; publishing it (even refreshed) uploaded them."""
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/home/someone/models/SmolLM2-135M-Instruct"
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evaluation_results.json").write_text(json.dumps({"model": "/home/someone/run/cell2text-demo",
                                                                   "fields": {"cell_type": {"T/NK cell": 1}},
                                                                   "tokens": ["/", "~", "//"]}))
    tokenizer = (model_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="config.json holds paths of this machine .*/home/someone.*--refresh-code"):
        check_hub_ready(model_dir)
    hub = FakeHub()
    publish_model(model_dir, "org/x", api=hub, refresh_code=True)
    assert json.loads((model_dir / "config.json").read_text())["text_config"]["_name_or_path"] == \
        "SmolLM2-135M-Instruct"
    assert json.loads((model_dir / "evaluation_results.json").read_text()) == {
        "model": "cell2text-demo", "fields": {"cell_type": {"T/NK cell": 1}}, "tokens": ["/", "~", "local"]}
    assert (model_dir / "tokenizer.json").read_bytes() == tokenizer  # a tokenizer's merges hold "/" as text
    assert not any("/home/someone" in path.read_text() for path in model_dir.glob("*.json"))


def test_a_refused_model_creates_no_dataset_repo(model_dir, tmp_path, monkeypatch):
    # `publish --corpus` made the (public by default) dataset repo, then refused the model
    from hub_cards import publish
    from hub_cards.render import save_model_card

    save_model_card(model_dir, {"split": "test", "num_cells": 8, "weights_sha256": "0" * 64, "fields": {}},
                    repo_id="org/old", base_model="b", encoder="e", dataset_id="org/old-corpus", training_config={})
    corpus = corpus_folder(tmp_path / "corpus")
    hub = FakeHub()
    monkeypatch.setattr(publish, "HfApi", lambda: hub)
    with pytest.raises(SystemExit):
        publish.main(["--model", str(model_dir), "--repo", "org/x", "--corpus", str(corpus),
                      "--dataset-repo", "org/x-corpus"])
    assert hub.calls == []


@pytest.mark.parametrize("repos", [["--repo", "org/x/y"], ["--repo", "org/x", "--dataset-repo", "my corpus"]])
def test_a_repo_id_the_hub_refuses_is_refused_before_anything_in_one_line(model_dir, tmp_path, monkeypatch, repos):
    """huggingface_hub's HFValidationError came after the folder's checks, as another library's traceback."""
    from hub_cards import publish

    hub = FakeHub()
    monkeypatch.setattr(publish, "HfApi", lambda: hub)
    corpus = ["--corpus", str(corpus_folder(tmp_path / "corpus"))] if "--dataset-repo" in repos else []
    with pytest.raises(SystemExit, match=r"^publish: error: '(org/x/y|my corpus)' is not a Hub repo id: .*Give it as "
                                         "owner/name.$"):
        publish.main(["--model", str(model_dir), *repos, *corpus])
    assert hub.calls == []


def test_the_corpus_summary_is_uploaded_without_paths_of_this_machine(tmp_path):
    from hub_cards.publish import corpus_files_to_upload

    (tmp_path / "summary.json").write_text(json.dumps({"source": "/home/me/census_like", "name": "/home/me/census_like",
                                                       "n_cells": 3}))
    (tmp_path / "rejects.csv").write_text("cell,reason\n")
    (tmp_path / "unmapped_genes.txt").write_text("")
    files = corpus_files_to_upload(tmp_path)
    assert json.loads(files["summary.json"]) == {"source": "census_like", "name": "census_like", "n_cells": 3}
    assert files["rejects.csv"] == b"cell,reason\n"


def test_publish_model_with_its_corpus_makes_both_repos_then_pushes_the_model_then_the_corpus(model_dir, tmp_path,
                                                                                              monkeypatch, capsys):
    # one owner for the order (the command line had its own copy of publish_model's steps)
    from hub_cards import publish

    corpus = corpus_folder(tmp_path / "corpus")
    with pytest.raises(ValueError, match="corpus_dir needs dataset_id"):
        publish_model(model_dir, "org/x", api=FakeHub(), corpus_dir=corpus)
    hub = FakeHub()
    monkeypatch.setattr(publish, "publish_corpus",
                        lambda folder, repo, private, api: api.calls.append(("publish_corpus", repo, folder)))
    publish_model(model_dir, "org/x", api=hub, dataset_id="org/x-corpus", corpus_dir=corpus)
    assert [(call, repo) for call, repo, _ in hub.calls] == [
        ("create_repo", "org/x-corpus"), ("create_repo", "org/x"), ("upload_folder", "org/x"),
        ("publish_corpus", "org/x-corpus")]
    hub.calls.clear()
    monkeypatch.setattr(publish, "HfApi", lambda: hub)
    publish.main(["--model", str(model_dir), "--repo", "org/x", "--corpus", str(corpus),
                  "--dataset-repo", "org/x-corpus"])
    assert hub.calls[-1] == ("publish_corpus", "org/x-corpus", str(corpus))
    assert capsys.readouterr().out.splitlines() == ["model: https://huggingface.co/org/x",
                                                    "corpus: https://huggingface.co/datasets/org/x-corpus"]
