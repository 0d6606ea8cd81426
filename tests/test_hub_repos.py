"""A model loaded by its Hub repo id is checked as a local folder is (a reviewer's findings: each check looked at
the local path only, so the same bad repo that a folder refuses loaded from the Hub, exit 0). Offline: the repos
are put into a Hub cache as a download leaves them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from test_model_processor_check import composed_dir, edited_copy, swap_two_genes  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM, pipeline

from modeling_cell2text import Cell2TextForConditionalGeneration
from modeling_cell2text.compatibility import ModelProcessorMismatchError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_as_repo(folder: Path, cache: Path, repo_id: str) -> str:
    """`folder`'s files as the main revision of `repo_id` in the Hub cache `cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    return repo_id


def test_a_repo_with_an_adapter_naming_another_base_is_refused(composed_dir, hub_cache, tmp_path):  # noqa: F811
    """transformers' Auto classes load the base model an adapter names, with the adapter on top, instead of the
    repo's own weights: a repo holding merged weights and a stray adapter of its predecessor loaded the
    predecessor."""
    from peft import LoraConfig, get_peft_model

    cache_as_repo(composed_dir, hub_cache, "org/cell2text-v1")
    model = Cell2TextForConditionalGeneration.from_pretrained(composed_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    v2 = tmp_path / "v2"
    shutil.copytree(composed_dir, v2)
    for path in (tmp_path / "adapter").iterdir():
        shutil.copy(path, v2 / path.name)
    adapter_config = json.loads((v2 / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "org/cell2text-v1"
    (v2 / "adapter_config.json").write_text(json.dumps(adapter_config))
    cache_as_repo(v2, hub_cache, "org/cell2text-v2")

    match = "org/cell2text-v2 holds a model and a PEFT adapter \\(adapter_config.json\\) for the base model " \
            "org/cell2text-v1"
    with pytest.raises(OSError, match=match):
        AutoModelForCausalLM.from_pretrained("org/cell2text-v2")
    with pytest.raises(OSError, match="holds a PEFT adapter"):
        Cell2TextForConditionalGeneration.from_pretrained("org/cell2text-v2")
    assert isinstance(AutoModelForCausalLM.from_pretrained("org/cell2text-v1"), Cell2TextForConditionalGeneration)
    # a repo of the adapter alone (the usual way to share a LoRA): its base with the adapter on top, as transformers
    # loads it
    lora = tmp_path / "lora"
    lora.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(v2 / name, lora / name)
    cache_as_repo(lora, hub_cache, "org/cell2text-lora")
    for adapted in (AutoModelForCausalLM.from_pretrained("org/cell2text-lora"),
                    Cell2TextForConditionalGeneration.from_pretrained("org/cell2text-lora"),
                    Cell2TextForConditionalGeneration.from_pretrained(lora)):  # the folder too
        assert any("lora_" in name for name, _ in adapted.named_parameters())


def test_a_repos_generation_config_that_does_not_read_is_refused(composed_dir, hub_cache, tmp_path):  # noqa: F811
    """transformers replaced it by defaults with a log line (the repo's max_new_tokens and eos dropped)."""
    folder = tmp_path / "bad"
    shutil.copytree(composed_dir, folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": 2, "max_new_tokens": 7,, }')
    cache_as_repo(folder, hub_cache, "org/bad-generation-config")
    with pytest.raises(OSError, match="generation_config.json' is not a valid JSON file"):
        Cell2TextForConditionalGeneration.from_pretrained("org/bad-generation-config")
    cache_as_repo(composed_dir, hub_cache, "org/good")
    model = Cell2TextForConditionalGeneration.from_pretrained("org/good")
    assert model.generation_config.to_dict() == Cell2TextForConditionalGeneration.from_pretrained(
        composed_dir).generation_config.to_dict()


def test_pipeline_of_a_repo_names_why_its_processor_does_not_fit(composed_dir, hub_cache, tmp_path):  # noqa: F811
    """The repo's processor error, not "none was found with the model" (the check looked for a local file)."""
    cache_as_repo(edited_copy(composed_dir, tmp_path / "permuted", swap_two_genes), hub_cache, "org/permuted")
    with pytest.raises(ModelProcessorMismatchError, match="gene vocabulary checksum"):
        pipeline("cell-to-text", model="org/permuted", device="cpu")


def test_pipeline_of_a_repo_revision_names_why_that_revisions_processor_does_not_fit(
        composed_dir, hub_cache, tmp_path):  # noqa: F811
    """The check read the main revision's processor (which fits) and said "none was found" for the revision asked."""
    cache_as_repo(composed_dir, hub_cache, "org/cell2text")
    other = "fedcba9876543210fedcba9876543210fedcba98"
    permuted = edited_copy(composed_dir, tmp_path / "permuted", swap_two_genes)
    shutil.copytree(permuted, hub_cache / "models--org--cell2text" / "snapshots" / other)
    with pytest.raises(ModelProcessorMismatchError, match="gene vocabulary checksum"):
        pipeline("cell-to-text", model="org/cell2text", revision=other, device="cpu")
    pipeline("cell-to-text", model="org/cell2text", device="cpu")  # main: the model with its own processor


def test_a_repos_commit_is_recorded_as_the_models_revision(composed_dir, hub_cache):  # noqa: F811
    """transformers 5 no longer records it: `tl.describe` wrote revision "unknown" for every Hub model."""
    from modeling_cell2text import tl

    cache_as_repo(composed_dir, hub_cache, "org/cell2text")
    provenance = tl.model_provenance(Cell2TextForConditionalGeneration.from_pretrained("org/cell2text"))
    assert {key: provenance[key] for key in ("model", "revision")} == {"model": "org/cell2text", "revision": COMMIT}
    assert tl.model_provenance(Cell2TextForConditionalGeneration.from_pretrained(composed_dir))["revision"] \
        .startswith("sha256:")  # a folder: the checksum of its weights


def test_a_model_in_a_repos_subfolder_describes_with_that_subfolders_processor(composed_dir, hub_cache):  # noqa: F811
    """transformers names the repo without the subfolder: the processor was looked for at the repo's root (none
    there: an error naming the wrong place) and the record did not say which model of the repo ran."""
    from modeling_cell2text import tl
    from test_pipeline import make_adata

    cache_as_repo(composed_dir.parent, hub_cache, "org/models")
    model = Cell2TextForConditionalGeneration.from_pretrained("org/models", subfolder=composed_dir.name)
    adata = make_adata(2)
    tl.describe(adata, model, max_new_tokens=4, constrained=False, progress=False)
    record = adata.uns["cell2text"]
    assert (record["model"], record["subfolder"], record["revision"]) == ("org/models", composed_dir.name, COMMIT)


def test_a_repo_in_the_cache_passes_the_offline_check(composed_dir, hub_cache, monkeypatch):  # noqa: F811
    from modeling_cell2text import tl

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="not in the Hugging Face cache"):
        tl.check_model_path("org/cell2text")
    cache_as_repo(composed_dir, hub_cache, "org/cell2text")
    tl.check_model_path("org/cell2text")


def test_evaluation_reads_a_cached_repos_saved_dtype(composed_dir, hub_cache, tmp_path):  # noqa: F811
    # the second reader's finding: a repo id was taken as float32 whatever its config.json said
    from training.evaluation.evaluate import saved_dtype

    bf16 = tmp_path / "bf16"
    shutil.copytree(composed_dir, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    cache_as_repo(bf16, hub_cache, "org/cell2text-bf16")
    assert saved_dtype("org/cell2text-bf16") == "bfloat16"
