"""Publish a trained Cell2Text (and optionally its corpus) to the Hugging Face Hub.

```bash
python -m hub_cards.publish --model outputs/demo/cell2text-demo --repo your-org/cell2text-pbmc68k \
    [--corpus outputs/demo/corpus --dataset-repo your-org/cell2text-pbmc68k-corpus] [--private] [--refresh-code]
```

The model folder is checked before anything is uploaded: safetensors weights, the processor (gene vocabulary,
tokenizer, prompt), the remote code files with `auto_map` (the installed package's files, byte for byte), the
`cell-to-text` pipeline entry, a model card whose metadata parses and whose evaluation was of these weights and
gene vocabulary, and no file a Cell2Text folder is not made of (the folder is uploaded whole); a corpus published
with it must be the build it was trained on. Where the folder holds the files
`hub_cards.render.save_model_card` writes beside the card (`evaluation_results.json`, `model_card_inputs.json`;
the demo writes both), the card is re-rendered from them
for the repo it is published to, so its usage lines name that repo. The corpus card is pushed after the data and
keeps the metadata `datasets` writes (`hub_cards.render.push_dataset_card`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE
from transformers.utils import (CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, CONFIG_NAME, FEATURE_EXTRACTOR_NAME,
                                GENERATION_CONFIG_NAME, PROCESSOR_NAME)

import modeling_cell2text
from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor
from modeling_cell2text.argument_types import refused_input_as_one_line
from modeling_cell2text.compatibility import KEPT_SUBSET_FIX, check_model_and_processor, holds_kept_subset, kept_subset
from modeling_cell2text.modeling_cell2text import foreign_weight_files, weights_file_names
from modeling_cell2text.pipeline_cell2text import EARLIER_SAVE_FILES
from modeling_cell2text.tl import weights_sha256

from .render import (
    EVALUATION_RESULTS,
    MODEL_CARD_INPUTS,
    dataset_url,
    machine_paths,
    push_dataset_card,
    read_folder_json,
    rerender_model_card,
    without_machine_paths,
    write_dataset_card,
)

# Where the installed package's code lives: the code a folder ships must be these files, byte for byte.
PACKAGE_CODE_DIR = Path(modeling_cell2text.__file__).parent

REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json")
# Files of a model folder that are not uploaded: the trainer's state, what the card is rendered from, and the
# .gitattributes of a clone or `hf download --local-dir` copy of the repo (the repo keeps its own; huggingface_hub
# skips .git/ and .cache/huggingface/ itself).
NOT_UPLOADED = ("training_state.json", MODEL_CARD_INPUTS, ".gitattributes")
# The weights files of a repo (whole or sharded, any variant): those an upload does not hold are deleted with it, so
# a model republished in the other layout leaves no stale weights for from_pretrained to load (or refuse).
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index*.json")
# The files of a repo that loading reads and an upload that does not hold them deletes: the weights (above), and an
# earlier save's tokenizer and template files, which transformers reads beside the new ones (every user's load of
# the processor was refused as another processor's, `Cell2TextPipeline._check_processor_reads_back`).
DELETED_UNLESS_UPLOADED = (*WEIGHT_FILES, *EARLIER_SAVE_FILES, f"{CHAT_TEMPLATE_DIR}/*")


def _auto_map_references(settings: Any) -> list[str]:
    """Every "module.Class" an `auto_map` names, at any depth of a saved config (a processor nests its parts')."""
    if isinstance(settings, list):
        return [ref for item in settings for ref in _auto_map_references(item)]
    if not isinstance(settings, dict):
        return []
    found = []
    for key, value in settings.items():
        if key == "auto_map" and isinstance(value, dict):
            found += [ref for refs in value.values() for ref in ([refs] if isinstance(refs, str) else refs or []) if ref]
        else:
            found += _auto_map_references(value)
    return found


def _code_references(model_dir: Path, config: dict, pipeline: bool = True) -> list[str]:
    """Every "module.Class" a trust_remote_code load of the folder starts from: its configs' `auto_map`s and (with
    `pipeline`) the `cell-to-text` pipeline's `impl`."""
    references = _auto_map_references(config)
    if pipeline:
        references += [entry.get("impl") or "" for entry in config.get("custom_pipelines", {}).values()]
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            references += _auto_map_references(read_folder_json(model_dir / name))
    return [ref for ref in references if ref]


def _remote_code_files(model_dir: Path, config: dict, pipeline: bool = True) -> list[str]:
    """The code files a trust_remote_code load of this folder reads: the modules `_code_references` names and every
    module they import relatively, recursively."""
    from transformers.dynamic_module_utils import get_relative_imports

    queue = sorted({f"{ref.split('.')[0]}.py" for ref in _code_references(model_dir, config, pipeline)})
    files: list[str] = []
    while queue:
        name = queue.pop(0)
        if name in files:
            continue
        files.append(name)
        if (model_dir / name).exists():
            queue += [f"{module}.py" for module in get_relative_imports(model_dir / name)]
    return files


def code_sha256(model_dir: str | Path, from_folder: str = "all") -> str | None:
    """A checksum of the code files a trust_remote_code load of the folder reads (`_remote_code_files`): which code
    an evaluation, and the card's figures, came from. ``from_folder`` says which files ran as the folder holds them,
    the others as the installed package does: "all" (what the folder ships), "model" (a run that loaded the
    model and processor classes from the folder and decoded with the package's code) or "none" (the package's
    classes). None where the folder names no code (no auto_map)."""
    model_dir = Path(model_dir)
    config = read_folder_json(model_dir / "config.json")
    names = sorted(_remote_code_files(model_dir, config))
    if not names:
        return None
    folder_files = {"all": set(names), "model": set(_remote_code_files(model_dir, config, pipeline=False)),
                    "none": set()}[from_folder]
    digest = hashlib.sha256()
    for name in names:
        path = (model_dir if name in folder_files else PACKAGE_CODE_DIR) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def foreign_code_references(model_dir: Path, config: dict) -> list[str]:
    """The "module.Class" references of a folder (`_code_references`) that name no class of the installed package's
    modules: a renamed or added module (its own copy of the code) would run for a user with trust_remote_code, while
    the checks here load the installed classes and compare only the files the package also has."""
    import importlib

    foreign = []
    for reference in _code_references(model_dir, config):
        module, _, name = reference.rpartition(".")
        known = (PACKAGE_CODE_DIR / f"{module}.py").is_file() and hasattr(
            importlib.import_module(f"{modeling_cell2text.__name__}.{module}"), name)
        if not known:
            foreign.append(reference)
    return sorted(set(foreign))


def stale_code_files(model_dir: Path, config: dict) -> list[str]:
    """The remote code files of a folder that differ from the installed package's files of the same name."""
    return [name for name in _remote_code_files(model_dir, config)
            if (model_dir / name).is_file() and (PACKAGE_CODE_DIR / name).is_file()
            and _differs_from_package(model_dir, name)]


def uploaded_files(folder: Path, ignored: tuple[str, ...] = ()) -> list[str]:
    """The files (paths relative to `folder`, at any depth, hidden ones too) that `HfApi.upload_folder` uploads of
    `folder` with `ignored` as its ignore patterns: all but those and huggingface_hub's own (.git/, .cache/)."""
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(names, ignore_patterns=[*ignored, *DEFAULT_IGNORE_PATTERNS]))


def model_folder_files(model_dir: Path, config: dict, processor: Any) -> set[str]:
    """The files a Cell2Text model folder is made of: what `save_model_folder` writes (the configs, the safetensors
    weights whole or sharded, the processor's and its tokenizer's files, the remote code that a trust_remote_code
    load reaches), the files of earlier saves that loading still reads (`EARLIER_SAVE_FILES`), and the card with
    its saved evaluation. ``processor`` (the folder's, loaded) names its tokenizer's vocabulary files; tokenizer.json
    is always one (a GPT2Tokenizer, as SmolLM2's on the Hub, names only vocab.json and merges.txt, yet saves it)."""
    whole, index = weights_file_names()
    shards = set(read_folder_json(model_dir / index).get("weight_map", {}).values()) if (
        model_dir / index).is_file() else set()
    templates = {f"{CHAT_TEMPLATE_DIR}/{path.name}" for path in (model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")}
    return {CONFIG_NAME, GENERATION_CONFIG_NAME, whole, index, *shards, PROCESSOR_NAME, TOKENIZER_CONFIG_FILE,
            FULL_TOKENIZER_FILE, CHAT_TEMPLATE_FILE, *templates, *processor.tokenizer.vocab_files_names.values(), *EARLIER_SAVE_FILES,
            *_remote_code_files(model_dir, config), "README.md", EVALUATION_RESULTS}


def _refuse_files_not_of(folder: Path, expected: set[str], what: str, ignored: tuple[str, ...] = ()) -> None:
    """Raise `ValueError` naming the files of `folder` that would be uploaded (`uploaded_files`) but are no part of
    `what` (a stray copy of the weights, a notebook's checkpoints, a script): refused, not skipped, so the repo
    holds what the folder was checked as."""
    stray = [name for name in uploaded_files(folder, ignored) if name not in expected]
    if stray:
        raise ValueError(f"{folder} holds {stray}, which are no part of {what} (no load reads them) and would be "
                         "uploaded with it: move them out of the folder first.")


def _path_holding_files(model_dir: Path) -> list[Path]:
    """The uploaded files in which earlier versions wrote paths of the building machine: config.json (the parts'
    folders) and the saved evaluation. Not the tokenizer's: its merges hold "/" and "~" as text."""
    return [model_dir / name for name in ("config.json", EVALUATION_RESULTS) if (model_dir / name).is_file()]


def _differs_from_package(model_dir: Path, name: str) -> bool:
    """Whether the folder's code file `name` is missing or not the installed package's file of that name."""
    return not ((model_dir / name).is_file()
                and (model_dir / name).read_bytes() == (PACKAGE_CODE_DIR / name).read_bytes())


def refresh_remote_code(model_dir: str | Path) -> list[str]:
    """Bring a folder saved by an earlier version to what this one saves: the installed package's code over the
    folder's code files that differ, and those its code now imports that the folder lacks (until none is left),
    and config.json and the saved evaluation without paths of the machine that wrote them (`without_machine_paths`:
    earlier versions kept the parts' folders and absolute paths there). Returns the names of the files changed."""
    model_dir = Path(model_dir)
    config = read_folder_json(model_dir / "config.json")
    changed: list[str] = []
    while True:
        outdated = [name for name in _remote_code_files(model_dir, config)
                    if (PACKAGE_CODE_DIR / name).is_file() and _differs_from_package(model_dir, name)]
        if not outdated:
            break
        for name in outdated:
            shutil.copyfile(PACKAGE_CODE_DIR / name, model_dir / name)
        changed += outdated
    for path in _path_holding_files(model_dir):
        content = read_folder_json(path)
        if machine_paths(content):
            path.write_text(json.dumps(without_machine_paths(content), indent=2, sort_keys=False) + "\n")
            changed.append(path.name)
    return changed


def _check_card_is_of_this_model(model_dir: Path, config: dict) -> None:
    """Refuse a saved evaluation (the card's figures) of other weights, another gene vocabulary or other code."""
    results_file = model_dir / EVALUATION_RESULTS
    if not results_file.is_file():
        return
    results = read_folder_json(results_file)
    fix = ("render its card from an evaluation of this model (python -m training.evaluation.evaluate, then "
           "hub_cards.render.save_model_card with its results.json; python -m training.demo --reuse-models does both "
           f"for the main job's model), or remove README.md, {EVALUATION_RESULTS} and {MODEL_CARD_INPUTS}.")
    evaluated = results.get("gene_vocabulary_sha256")
    if evaluated is not None and evaluated != config.get("gene_vocabulary_sha256"):
        raise ValueError(
            f"{model_dir}/{EVALUATION_RESULTS} (the card's figures) evaluated a model with another gene vocabulary "
            f"({evaluated[:12]}..., this model's: {str(config.get('gene_vocabulary_sha256'))[:12]}...): {fix}")
    evaluated = results.get("weights_sha256")
    if evaluated is not None and evaluated != weights_sha256(model_dir):
        raise ValueError(f"{model_dir}/{EVALUATION_RESULTS} (the card's figures) evaluated other weights than the "
                         f"folder holds: {fix}")
    evaluated = results.get("code_sha256")
    if evaluated is not None and evaluated != code_sha256(model_dir):
        raise ValueError(f"{model_dir}/{EVALUATION_RESULTS} (the card's figures) was measured with other model code "
                         f"than the folder holds (--refresh-code, or another version of Cell2Text): {fix}")


def check_hub_ready(model_dir: str | Path, card: ModelCard | None = None) -> None:
    """Raise `FileNotFoundError`/`ValueError`/`OSError` naming what a Hub-ready Cell2Text folder lacks or holds
    wrongly: its files, remote code (present, and the installed package's), the card's evaluation (of these weights
    and gene vocabulary) and metadata (of ``card``, the card rendered to replace README.md, where given), then the
    model and processor loaded and checked together (a processor holding a subset of the model's labels, kept with
    `keep_labels`, refused)."""
    model_dir = Path(model_dir)
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).exists()]
    if not (model_dir / "model.safetensors").exists() and list(model_dir.glob("model-*.safetensors")):
        missing.remove("model.safetensors")  # sharded weights
    if missing:
        raise FileNotFoundError(
            f"{model_dir} is not a complete Cell2Text folder; missing {missing}. Save it with "
            "modeling_cell2text.save_model_folder(model, processor, dir) (training.sft does)."
        )
    config = read_folder_json(model_dir / "config.json")
    if "AutoModelForCausalLM" not in config.get("auto_map", {}):
        raise ValueError(f"{model_dir}/config.json has no auto_map: it would not load with trust_remote_code.")
    if "cell-to-text" not in config.get("custom_pipelines", {}):
        raise ValueError(f"{model_dir}/config.json has no custom_pipelines entry for 'cell-to-text': save the folder "
                         "with modeling_cell2text.save_model_folder(model, processor, dir), which saves the pipeline.")
    foreign = foreign_code_references(model_dir, config)
    if foreign:
        raise ValueError(
            f"{model_dir}'s auto_map or custom_pipelines name {foreign}, which are no classes of the installed "
            "Cell2Text's modules (a renamed or added copy of its code, or a misspelt name): a user with "
            "trust_remote_code would run that code, not the code this check loads. Save the folder again with "
            "modeling_cell2text.save_model_folder(model, processor, dir), which names the package's own modules."
        )
    missing_code = [name for name in _remote_code_files(model_dir, config) if not (model_dir / name).exists()]
    if missing_code:
        raise FileNotFoundError(
            f"{model_dir} lacks the code files {missing_code}, which its auto_map needs (directly or by a relative "
            "import). Pass --refresh-code to copy them from the installed package, or save the folder again with "
            "modeling_cell2text.save_model_folder(model, processor, dir)."
        )
    stale = stale_code_files(model_dir, config)
    if stale:
        raise ValueError(
            f"{model_dir}'s code files {stale} differ from the installed Cell2Text's, which this check loads: a user "
            "without the package would run other code. Pass --refresh-code to copy the installed files into the "
            "folder (or save it again with modeling_cell2text.save_model_folder)."
        )
    for path in _path_holding_files(model_dir):
        paths = machine_paths(read_folder_json(path))
        if paths:
            raise ValueError(f"{path} holds paths of this machine (e.g. {paths[0]}), which would be uploaded: pass "
                             "--refresh-code to rewrite it without them (a folder saved by an earlier version).")
    _check_card_is_of_this_model(model_dir, config)
    foreign = foreign_weight_files(model_dir)
    if foreign:
        raise ValueError(f"{model_dir} holds {foreign} beside its merged weights, which would be uploaded with them "
                         "(and an adapter applied on top of them when loaded): remove them first.")
    if card is not None:
        ModelCard(str(card))  # raises on malformed metadata
    elif (model_dir / "README.md").exists():
        ModelCard.load(model_dir / "README.md")
    # Loaded as a user would (the installed classes, no remote code): weights that do not match config.json and a
    # processor that does not fit the model are refused here rather than on the Hub. The processor (quick to load)
    # names its tokenizer's files, so stray files are refused before the model is loaded (minutes for a large one).
    processor = Cell2TextProcessor.from_pretrained(model_dir)
    if holds_kept_subset(processor):
        raise ValueError(f"{model_dir}'s processor holds {kept_subset(processor)}, kept with keep_labels: every "
                         f"user of the repo would describe cells among those only. {KEPT_SUBSET_FIX[0].upper()}"
                         f"{KEPT_SUBSET_FIX[1:]}.")
    _refuse_files_not_of(model_dir, model_folder_files(model_dir, config, processor), "a Cell2Text model folder",
                         NOT_UPLOADED)
    model_config = Cell2TextForConditionalGeneration.from_pretrained(model_dir, dtype="auto").config
    check_model_and_processor(model_config, processor)


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub refuses (`huggingface_hub`'s check, which stopped publishing after the folder's
    checks, and a corpus build after its hours, with its traceback): before anything is built or uploaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repo id: {error}".removesuffix(
            " Use `repo_type` argument if needed.") + " Give it as owner/name.") from error


def check_private(api: HfApi, repo_id: str, repo_type: str, private: bool) -> None:
    """Refuse `private` for a repo that exists and is public: checked before any repo is made or file written."""
    if not private:
        return
    try:
        public = not api.repo_info(repo_id, repo_type=repo_type).private
    except RepositoryNotFoundError:
        return
    if public:
        raise ValueError(f"The {repo_type} repo {repo_id} exists and is public, and --private was asked: make it "
                         "private in its settings on the Hub first, or publish without --private.")


def ensure_repo(api: HfApi, repo_id: str, repo_type: str, private: bool) -> str:
    """Create the repo where it does not exist; refuse a public one where `private` was asked (again after
    creating: it may have been made meanwhile). Returns its URL."""
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        raise ValueError(f"The {repo_type} repo {repo_id} exists and is public, and --private was asked: make it "
                         "private in its settings on the Hub first, or publish without --private.")
    return str(url)


def prepare_model_folder(model_dir: str | Path, repo_id: str, *, dataset_id: str | None = None,
                         refresh_code: bool = False) -> ModelCard | None:
    """Check the folder for upload to ``repo_id`` (`check_hub_ready`) with its card re-rendered for that repo
    (where its inputs are saved; naming ``dataset_id``, the corpus published with it, where given), and return that
    card (None: the folder's card stays as it is), which `upload_model_folder` writes: a refused folder keeps its
    card. ``refresh_code`` first brings a folder saved by an earlier version up to date (`refresh_remote_code`)."""
    if refresh_code:
        refresh_remote_code(model_dir)
    card = rerender_model_card(model_dir, repo_id, dataset_id=dataset_id, save=False)
    check_hub_ready(model_dir, card)
    return card


def upload_model_folder(model_dir: str | Path, repo_id: str, private: bool = False, api: HfApi | None = None,
                        card: ModelCard | None = None) -> str:
    """Create the model repo where needed, write ``card`` (`prepare_model_folder`'s) into the folder and upload
    it; returns the URL."""
    api = api or HfApi()
    url = ensure_repo(api, repo_id, "model", private)
    if card is not None:
        card.save(Path(model_dir) / "README.md")
    api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                      ignore_patterns=list(NOT_UPLOADED), delete_patterns=list(DELETED_UNLESS_UPLOADED),
                      commit_message="Upload Cell2Text")
    return url


def publish_model(model_dir: str | Path, repo_id: str, private: bool = False, api: HfApi | None = None, *,
                  dataset_id: str | None = None, refresh_code: bool = False,
                  corpus_dir: str | Path | None = None) -> str:
    """`prepare_model_folder`, `check_private`, then `upload_model_folder`; returns the model's URL. With
    ``corpus_dir``, the corpus the model was trained on is pushed after it to the dataset repo ``dataset_id``
    (`publish_corpus`). Nothing is written (but what ``refresh_code`` asks for) or created on the Hub for a folder
    or corpus that is refused, and both repos are checked before the model is uploaded."""
    for repo in (repo_id, dataset_id):
        if repo is not None:
            check_repo_id(repo)
    if corpus_dir is not None:
        if dataset_id is None:
            raise ValueError("corpus_dir needs dataset_id, the dataset repo to push the corpus to")
        check_corpus_files(corpus_dir)
        check_corpus_is_the_models(model_dir, corpus_dir)
    card = prepare_model_folder(model_dir, repo_id, dataset_id=dataset_id, refresh_code=refresh_code)
    api = api or HfApi()
    check_private(api, repo_id, "model", private)
    if corpus_dir is not None:
        check_private(api, dataset_id, "dataset", private)
        ensure_repo(api, dataset_id, "dataset", private)  # before the model is uploaded
    url = upload_model_folder(model_dir, repo_id, private, api, card)
    if corpus_dir is not None:
        publish_corpus(corpus_dir, dataset_id, private, api)
    return url


CORPUS_FILES = ("summary.json", "rejects.csv", "unmapped_genes.txt")


def check_corpus_is_the_models(model_dir: str | Path, corpus_dir: str | Path) -> None:
    """Refuse to publish a corpus with a model that was trained on another build (the card would name it)."""
    from processing.corpus import read_summary

    trained_on = read_folder_json(Path(model_dir) / "config.json").get("training_corpus_fingerprints")
    built = read_summary(Path(corpus_dir) / "summary.json").get("fingerprints")
    if trained_on and built and trained_on != built:
        raise ValueError(f"{model_dir} was trained on another corpus build than {corpus_dir} (split fingerprints "
                         f"{trained_on} against {built}): publish the corpus it was trained on, or the model alone.")


def check_corpus_files(corpus_dir: str | Path) -> None:
    """Refuse a corpus that lacks a file publishing uploads (found missing only after the model and the splits were
    pushed), whose summary.json, rejects.csv or unmapped_genes.txt is corrupt (`read_summary`, `read_rejects`,
    `read_unmapped_genes`: found after the model was pushed, or uploaded as it was), or whose feature_extractor
    folder (uploaded whole) holds files that are no part of a saved feature extractor: its preprocessor_config.json
    and the remote code its auto_map reaches."""
    from processing.corpus import read_rejects, read_summary, read_unmapped_genes

    folder = Path(corpus_dir) / "feature_extractor"
    missing = [name for name in ("dataset_dict.json", *CORPUS_FILES, f"{folder.name}/{FEATURE_EXTRACTOR_NAME}")
               if not (Path(corpus_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{corpus_dir} lacks {missing}, which publishing uploads: publish a corpus folder as "
                                "python -m processing.build_corpus (or processing.join_corpus) wrote it.")
    read_summary(Path(corpus_dir) / "summary.json")
    read_rejects(corpus_dir)
    read_unmapped_genes(corpus_dir)
    _refuse_files_not_of(folder, {FEATURE_EXTRACTOR_NAME, *_remote_code_files(folder, {}, pipeline=False)},
                         "a saved feature extractor")


def corpus_files_to_upload(corpus_dir: str | Path) -> dict[str, bytes]:
    """The build's record files as uploaded beside the splits: summary.json without paths of this machine (a
    corpus built from local files names them, `without_machine_paths`), the others as they are."""
    from processing.corpus import read_summary

    files = {name: (Path(corpus_dir) / name).read_bytes() for name in CORPUS_FILES}
    summary = without_machine_paths(read_summary(Path(corpus_dir) / "summary.json"))
    files["summary.json"] = (json.dumps(summary, indent=2) + "\n").encode()
    return files


def publish_corpus(corpus_dir: str | Path, repo_id: str, private: bool = False, api: HfApi | None = None) -> str:
    """Push a built corpus to a Hub dataset repo: the splits (by `datasets`), then its card re-rendered for
    `repo_id`, the feature extractor it was tokenized with and the build's summary and rejects; returns the URL."""
    import datasets

    corpus_dir = Path(corpus_dir)
    check_corpus_files(corpus_dir)
    api = api or HfApi()
    ensure_repo(api, repo_id, "dataset", private)
    datasets.load_from_disk(str(corpus_dir)).push_to_hub(repo_id, private=private)
    push_dataset_card(write_dataset_card(corpus_dir, repo_id), repo_id)  # after the data: keeps datasets' metadata
    api.upload_folder(folder_path=str(corpus_dir / "feature_extractor"), path_in_repo="feature_extractor",
                      repo_id=repo_id, repo_type="dataset")
    for name, content in corpus_files_to_upload(corpus_dir).items():
        api.upload_file(path_or_fileobj=content, path_in_repo=name, repo_id=repo_id, repo_type="dataset")
    return dataset_url(repo_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A Hub-ready Cell2Text folder.")
    parser.add_argument("--repo", required=True, help="Model repo id, e.g. your-org/cell2text.")
    parser.add_argument("--corpus", help="Also push this corpus folder (python -m processing.build_corpus).")
    parser.add_argument("--dataset-repo", help="Dataset repo id for --corpus.")
    parser.add_argument("--private", action="store_true", help="Make the model repo (and the dataset repo) private.")
    parser.add_argument("--refresh-code", action="store_true",
                        help="Bring a folder saved by an earlier version up to date first: the installed package's "
                             "code files, and config.json and the saved evaluation without paths of this machine.")
    args = parser.parse_args(argv)
    if bool(args.corpus) != bool(args.dataset_repo):
        parser.error("--corpus and --dataset-repo go together")
    with refused_input_as_one_line("publish"):
        url = publish_model(args.model, args.repo, args.private, HfApi(), dataset_id=args.dataset_repo,
                            refresh_code=args.refresh_code, corpus_dir=args.corpus)
    print(f"model: {url}")
    if args.corpus:
        print(f"corpus: {dataset_url(args.dataset_repo)}")


if __name__ == "__main__":
    main()
