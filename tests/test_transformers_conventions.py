"""What transformers' common tests ask of every model, held for Cell2Text on a tiny random model: tuple outputs,
assisted decoding, generation from embeddings, chat templates, embedding resizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.sparse as sp
import torch
from test_pipeline import GENES, random_counts, save_tiny_model_folder

from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    folder = save_tiny_model_folder(tmp_path_factory.mktemp("conventions"), trained=False)
    return Cell2TextForConditionalGeneration.from_pretrained(folder).eval(), Cell2TextProcessor.from_pretrained(folder)


@pytest.fixture()
def inputs(model_and_processor):
    _, processor = model_and_processor
    return processor(sp.csr_matrix(random_counts(3, seed=2)), GENES)


def test_tuple_output_equals_the_dict_outputs_to_tuple(model_and_processor, inputs):
    model, _ = model_and_processor
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels, output_hidden_states=True)
        as_tuple = model(**inputs, labels=labels, output_hidden_states=True, return_dict=False)
        inner = model.model(**inputs, return_dict=False)
    expected = as_dict.to_tuple()
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected)
    torch.testing.assert_close(as_tuple[0], expected[0])  # the loss
    torch.testing.assert_close(as_tuple[1], expected[1])  # the logits
    assert isinstance(inner, tuple)
    model.config.return_dict = False  # as the common tests set it
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], as_dict.logits)
    finally:
        model.config.return_dict = True


def test_assisted_decoding_with_the_model_as_its_own_assistant_equals_greedy(model_and_processor, inputs):
    model, _ = model_and_processor
    row = {k: v[:1] for k, v in inputs.items()}  # assisted generation takes one sequence at a time
    greedy = model.generate(**row, max_new_tokens=8, do_sample=False)
    assisted = model.generate(**row, max_new_tokens=8, do_sample=False, assistant_model=model)
    assert torch.equal(greedy, assisted)


def test_generation_from_embeddings_equals_generation_from_ids(model_and_processor, inputs):
    model, _ = model_and_processor
    text_only = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    text_only["attention_mask"] = torch.ones_like(text_only["input_ids"])
    from_ids = model.generate(**text_only, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(text_only["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=text_only["attention_mask"], max_new_tokens=6,
                                 do_sample=False)
    assert torch.equal(from_ids[:, 5:], from_embeds)  # generate returns only the new tokens for embeddings
    # with cells: the placeholders are found in the embeddings
    with_cells = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    cell_embeds = model.get_input_embeddings()(inputs["input_ids"])
    cell_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
    from_cell_embeds = model.generate(inputs_embeds=cell_embeds, **cell_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(with_cells[:, inputs["input_ids"].shape[1]:], from_cell_embeds)


def test_chat_template_tokenizes_text_and_points_cells_to_the_processor(model_and_processor):
    _, processor = model_and_processor
    messages = [{"role": "user", "content": "Name a blood cell type."}]
    ids = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids.shape[0] == 1 and processor.tokenizer.decode(ids[0]) == text
    with pytest.raises(ValueError, match=r"processor\(cells, gene_ids\)"):
        processor.apply_chat_template([{"role": "user", "content": "Describe <cell><cell>"}], tokenize=True)


def test_resizing_below_the_cell_placeholder_is_refused(model_and_processor):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="would drop the cell placeholder"):
        model.resize_token_embeddings(model.config.cell_token_id)


@pytest.mark.parametrize("layer", [1, -1, 0])
def test_the_encoder_layers_above_the_one_read_are_not_run_and_change_nothing(model_and_processor, inputs, layer):
    model, _ = model_and_processor
    encoder = model.model.gene_encoder
    saved, model.config.gene_encoder_layer = model.config.gene_encoder_layer, layer
    ran = []
    hooks = [block.register_forward_hook(lambda *args, i=i: ran.append(i)) for i, block in enumerate(encoder.encoder.layer)]
    try:
        with torch.no_grad():
            features, _ = model.model.get_cell_features(inputs["gene_input_ids"], inputs["gene_attention_mask"],
                                                         inputs["gene_token_mask"])
        layers_run = list(ran)
        with torch.no_grad():  # the reference: every layer run, the state read by index
            full = encoder(input_ids=inputs["gene_input_ids"], attention_mask=inputs["gene_attention_mask"],
                           output_hidden_states=True).hidden_states[layer]
    finally:
        for hook in hooks:
            hook.remove()
        model.config.gene_encoder_layer = saved
    assert layers_run == list(range(layer % 3))  # hidden state k is the output of layer k - 1
    assert len(encoder.encoder.layer) == 2  # the model keeps every layer
    mask = inputs["gene_token_mask"].bool() & (inputs["gene_token_mask"].cumsum(1) <= model.config.num_cell_tokens)
    torch.testing.assert_close(features, model.model.multi_modal_projector(full[mask]), rtol=0, atol=0)


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, function-level imports included (read from the source)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "modeling_cell2text"
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modeling_cell2text."):
                imported.add(node.module.split(".")[1])
        graph[path.stem] = imported & modules
    return graph


def test_the_model_knows_neither_pipeline_nor_tl_and_no_module_imports_itself_back():
    graph = _package_imports()
    assert not graph["modeling_cell2text"] & {"pipeline_cell2text", "tl", "cli", "distributed"}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(m == target or (m not in seen and reaches(m, target, seen | {m})) for m in graph[start])

    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_a_model_saved_alone_names_no_pipeline_code_it_lacks(model_and_processor, tmp_path):
    model, _ = model_and_processor
    assert model.config.custom_pipelines  # loaded from a complete folder (save_model_folder)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "custom_pipelines" not in saved and not (tmp_path / "pipeline_cell2text.py").exists()
    assert isinstance(Cell2TextForConditionalGeneration.from_pretrained(tmp_path), Cell2TextForConditionalGeneration)


def test_a_callers_generation_config_is_honoured_and_the_placeholder_still_never_generated(model_and_processor, inputs,
                                                                                          monkeypatch):
    from transformers import GenerationConfig
    from transformers.generation import utils as generation_utils

    warned = []  # transformers deprecates a generation_config passed with loose settings (the placeholder's was one)
    monkeypatch.setattr(generation_utils.logger, "warning_once", lambda message, *args: warned.append(message))
    model, processor = model_and_processor
    with torch.no_grad():  # the token the model would write first: suppressed by the caller's config below
        first = model(**inputs).logits[:, -1].argmax(-1)
    banned = int(first[0])
    config = GenerationConfig(max_new_tokens=5, do_sample=False, suppress_tokens=[banned],
                              pad_token_id=processor.tokenizer.eos_token_id, eos_token_id=None)
    others = {name: value for name, value in inputs.items() if name != "input_ids"}
    # by name, and second as transformers orders generate's arguments (the reviewer's finding: given so, the
    # placeholder's loose settings overrode it: 160 tokens, the banned one first)
    for generate in (lambda: model.generate(**inputs, generation_config=config),
                     lambda: model.generate(inputs["input_ids"], config, **others)):
        with torch.no_grad():
            generated = generate()
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        assert new_tokens.shape == (3, 5)  # the caller's max_new_tokens, no early stop (eos_token_id None)
        assert not (new_tokens == banned).any()  # the caller's suppressed token
        assert not (new_tokens == model.config.cell_token_id).any()  # and the placeholder
        assert config.suppress_tokens == [banned]  # the caller's object is left as given
        assert not [message for message in warned if "generation-related" in message], warned
    with pytest.raises(TypeError, match="multiple values for argument 'generation_config'"):
        model.generate(inputs["input_ids"], config, generation_config=config, **others)


def test_generate_takes_the_processors_output_with_skipped_cells(model_and_processor):
    """processor(..., skip_empty_cells=True) also returns the rows kept and dropped: generate(**inputs) refused
    them as unused model kwargs."""
    model, processor = model_and_processor
    counts = random_counts(3, seed=2)
    counts[1] = 0  # a cell without genes: skipped
    inputs = processor(sp.csr_matrix(counts), GENES, skip_empty_cells=True)
    assert inputs["cell_indices"].tolist() == [0, 2] and inputs["skipped_cell_indices"].tolist() == [1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        expected = model.generate(**processor(sp.csr_matrix(counts[[0, 2]]), GENES), max_new_tokens=2,
                                  do_sample=False)
    assert torch.equal(generated, expected)


def test_generate_writes_whole_descriptions_unless_a_length_is_set(model_and_processor, inputs):
    """The reviewer's findings: model.generate(**inputs) without a length stopped after transformers' default of 20
    new tokens (mid-definition); saving 160 into the generation config then overrode a caller's max_length."""
    from transformers import GenerationConfig

    from modeling_cell2text.modeling_cell2text import DESCRIPTION_MAX_NEW_TOKENS

    model, processor = model_and_processor
    prompt = inputs["input_ids"].shape[1]
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.eos_token_id)
    with torch.no_grad():
        assert model.generate(**inputs, **settings).shape[1] - prompt == DESCRIPTION_MAX_NEW_TOKENS == 160
        assert model.generate(**inputs, **settings, max_length=prompt + 3).shape[1] == prompt + 3
        assert model.generate(**inputs, **settings, max_new_tokens=2).shape[1] == prompt + 2
        config = GenerationConfig(max_length=prompt + 4, **settings)
        assert model.generate(**inputs, generation_config=config).shape[1] == prompt + 4
        assert model.generation_config.max_new_tokens is None  # nothing saved with the model
        # the model's own length, also where the caller's config sets none (transformers fills it in from the model's)
        model.generation_config.max_new_tokens = 5
        try:
            assert model.generate(**inputs, **settings).shape[1] == prompt + 5
            assert model.generate(**inputs, generation_config=GenerationConfig(**settings)).shape[1] == prompt + 5
        finally:
            model.generation_config.max_new_tokens = None


def test_saving_again_in_the_other_weights_layout_leaves_one_and_a_folder_with_both_is_refused(model_and_processor,
                                                                                             tmp_path):
    """The reviewer's finding: saved whole, then sharded into the same folder, the earlier model.safetensors stayed
    and from_pretrained loaded it (another model's weights, exit 0)."""
    import shutil

    from modeling_cell2text import save_model_folder

    model, processor = model_and_processor
    other = Cell2TextForConditionalGeneration.from_pretrained(
        save_tiny_model_folder(tmp_path / "other", trained=False, seed=1))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def loads_this_model(folder, **variant):
        loaded = Cell2TextForConditionalGeneration.from_pretrained(folder, **variant).state_dict()
        return all(torch.equal(loaded[name], tensor) for name, tensor in weights.items())

    for variant in ({}, {"variant": "v2"}):  # the second reader's finding: a variant's files were not looked at
        for first, then in (({}, {"max_shard_size": "20KB"}), ({"max_shard_size": "20KB"}, {})):
            out = tmp_path / f"saved-{bool(first)}{variant.get('variant', '')}"
            save_model_folder(other, processor, out, **first, **variant)
            save_model_folder(model, processor, out, **then, **variant)
            assert loads_this_model(out, **variant)
            whole = "model.v2.safetensors" if variant else "model.safetensors"
            index = "model.safetensors.index.v2.json" if variant else "model.safetensors.index.json"
            assert (out / whole).exists() != (out / index).exists()
    assert (tmp_path / "saved-False" / "model.safetensors.index.json").exists()  # whole, then sharded
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "saved-False", both)
    save_model_folder(other, processor, tmp_path / "whole")
    shutil.copy(tmp_path / "whole" / "model.safetensors", both)
    with pytest.raises(OSError, match="holds its weights twice, whole .* and sharded"):
        Cell2TextForConditionalGeneration.from_pretrained(both)


def test_saving_over_an_earlier_index_removes_no_file_outside_the_folder(model_and_processor, tmp_path):
    """A reviewer's finding: saved whole over a folder holding an index, the shards it named were removed, also a
    file outside the folder where the index (of a folder downloaded, or edited) named one ("../notes.safetensors")."""
    import json

    model, _ = model_and_processor
    outside, folder = tmp_path / "notes.safetensors", tmp_path / "folder"
    outside.write_text("the user's file beside the folder")
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "../notes.safetensors", "b": str(outside), "c": "model-00001-of-00001.safetensors"}}))
    (folder / "model-00001-of-00001.safetensors").write_text("an earlier shard")
    model.save_pretrained(folder)
    assert outside.exists()
    assert sorted(path.name for path in folder.glob("model*safetensors*")) == ["model.safetensors"]  # the earlier layout gone


def test_chunked_prefill_with_cells_is_refused_naming_it(model_and_processor, inputs):
    # the reviewer's finding: it failed saying the processor expanded the cells wrongly
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="prefill_chunk_size splits the prompt"):
        model.generate(**inputs, max_new_tokens=3, prefill_chunk_size=16)
