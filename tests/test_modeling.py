"""Cell2Text model: loss and gradients, generation with and without cache, composition from pretrained parts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_parts import rewrite_weights, save_tiny_parts, tiny_bert_config, tiny_llama_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertConfig, GenerationConfig, LlamaConfig

from modeling_cell2text import Cell2TextConfig, Cell2TextForConditionalGeneration
from modeling_cell2text.modeling_cell2text import Cell2TextModel

CELL = 99  # the default cell token id of a text vocabulary of 100


def tiny_model(num_cell_tokens: int = 4, seed: int = 0, initializer_range: float = 0.02):
    torch.manual_seed(seed)
    config = Cell2TextConfig(
        gene_encoder_config=tiny_bert_config(50),
        text_config=tiny_llama_config(100, initializer_range=initializer_range),
        num_cell_tokens=num_cell_tokens,
        projector_hidden_size=16,
    )
    return Cell2TextForConditionalGeneration(config)


def cell_batch():
    """Two cells: 5 genes (truncated to 4 cell tokens) and 2 genes, V2 layout (<cls>=2 ... <eos>=3, pad=0)."""
    genes = torch.tensor([[2, 10, 11, 12, 13, 14, 3], [2, 20, 21, 3, 0, 0, 0]])
    gene_attention_mask = (genes != 0).long()
    gene_token_mask = (genes > 3).long()
    input_ids = torch.tensor([[5, CELL, CELL, CELL, CELL, 6, 7], [1, 1, 1, 5, CELL, CELL, 6]])
    attention_mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        gene_input_ids=genes,
        gene_attention_mask=gene_attention_mask,
        gene_token_mask=gene_token_mask,
    )


def test_default_config_gives_working_model():
    config = Cell2TextConfig(gene_encoder_config=tiny_bert_config(50), text_config=tiny_llama_config(100))
    assert config.num_cell_tokens == 256 and config.gene_encoder_layer == -2
    assert config.projector_hidden_size == 2048 and config.projector_dropout == 0.1 and config.freeze_gene_encoder
    assert config.cell_token_id == 99
    model = Cell2TextForConditionalGeneration(config)
    batch = cell_batch()
    batch["input_ids"][0, 5] = CELL  # all 5 genes of the first cell become cell tokens (top_k = 256)
    out = model(**batch)
    assert out.logits.shape == (2, 7, 100)


def test_loss_is_finite_and_only_projector_and_lm_get_gradients():
    model = tiny_model()
    batch = cell_batch()
    labels = batch["input_ids"].clone()
    labels[:, :6] = -100
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    projector_grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in projector_grads)
    assert all(p.grad is None and not p.requires_grad for p in model.model.gene_encoder.parameters())


def test_cell_features_follow_rank_order_and_skip_special_tokens():
    model = tiny_model().eval()
    batch = cell_batch()
    features, counts = model.model.get_cell_features(
        batch["gene_input_ids"], batch["gene_attention_mask"], batch["gene_token_mask"]
    )
    assert counts.tolist() == [4, 2]
    assert features.shape == (6, 32)


def test_placeholder_and_feature_count_mismatch_is_a_clear_error():
    model = tiny_model(num_cell_tokens=3)  # processor expanded to 4 placeholders for the first cell
    with pytest.raises(ValueError, match="placeholders per prompt \\[4, 2\\].*num_cell_tokens=3"):
        model(**cell_batch())


def test_placeholders_without_cells_is_an_error():
    model = tiny_model()
    batch = cell_batch()
    with pytest.raises(ValueError, match="no gene_input_ids"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # the reviewer's finding: as embeddings, the bare placeholder was read as a cell, exit 0
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="inputs_embeds hold the cell placeholder's embedding .* no gene_input_ids"):
        model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=2)


def test_generate_with_cache_equals_without_and_encodes_once():
    model = tiny_model(initializer_range=0.5).eval()
    batch = cell_batch()
    calls = []
    model.model.gene_encoder.register_forward_hook(lambda *args: calls.append(1))
    cached = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert len(calls) == 1
    uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 7:].flatten().tolist())) > 2  # the check compares real, varied token streams


def test_save_and_reload_gives_identical_logits(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, Cell2TextForConditionalGeneration)
    with torch.no_grad():
        diff = (model(**cell_batch()).logits - reloaded(**cell_batch()).logits).abs().max()
    assert diff <= 1e-6
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def header_not_json(good: bytes) -> bytes:
    """The file with its JSON header (length: the first 8 bytes, little-endian) overwritten by as many `{`."""
    length = int.from_bytes(good[:8], "little")
    return good[:8] + b"{" * length + good[8 + length :]


CORRUPTIONS = {
    "truncated": lambda good: good[:1000],
    "empty": lambda good: b"",
    "not safetensors": lambda good: b"this is not a safetensors file" * 10,
    "header not JSON": header_not_json,
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_weights_file_is_a_clear_error(tmp_path, kind):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[kind](weights.read_bytes()))
    with pytest.raises(OSError, match="truncated or corrupt") as caught:
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "SafetensorError"


def test_other_loading_errors_are_not_called_corrupt_weights(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError) as caught:  # transformers' own message: no weights file
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)
    assert "truncated or corrupt" not in str(caught.value)


def _edit(folder, config=None, weights=None):
    if config is not None:
        content = json.loads((folder / "config.json").read_text())
        config(content)
        (folder / "config.json").write_text(json.dumps(content))
    if weights is not None:
        tensors = load_file(folder / "model.safetensors")
        weights(tensors)
        rewrite_weights(folder / "model.safetensors", tensors)


@pytest.mark.parametrize(("edit", "message"), [
    (dict(weights=lambda t: t.pop("model.multi_modal_projector.linear_1.weight")),
     r"1 missing from the weights file \(they would be randomly initialised\), e.g. \['model.multi_modal_projector"),
    (dict(weights=lambda t: [t.__setitem__("x" + k, t.pop(k)) for k in list(t)]), "missing from the weights file"),
    (dict(config=lambda c: [c.update(tie_word_embeddings=False), c["text_config"].update(tie_word_embeddings=False)]),
     r"\['lm_head.weight'\]"),
    (dict(config=lambda c: c["text_config"].update(num_hidden_layers=1)),
     r"in the weights file but not in the model config.json describes \(they would be ignored\)"),
])
def test_weights_that_do_not_match_the_config_are_refused_not_random(tmp_path, edit, message):
    """The QA finding: a tensor missing from the file, renamed keys, an untied head or fewer layers in config.json
    loaded with random (or dropped) weights and gave other descriptions, exit 0; transformers only logs it."""
    tiny_model().save_pretrained(tmp_path)
    _edit(tmp_path, **edit)
    with pytest.raises(OSError, match=message) as caught:
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)
    assert "output_loading_info=True" in str(caught.value)
    model, info = Cell2TextForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)  # opt-in
    assert isinstance(model, Cell2TextForConditionalGeneration) and (info["missing_keys"] or info["unexpected_keys"])


@pytest.mark.parametrize("sharded", [False, True])
def test_weights_that_are_no_floating_point_numbers_are_refused_not_cast(tmp_path, sharded):
    """A model-folder hunt's finding: a weights file whose projector weight was stored as int32 (the same names and
    shapes) loaded, transformers casting the integers into the float parameter, and every score moved, exit 0.
    float16 weights of a float32 model hold the same numbers and load as before."""
    model = tiny_model()
    model.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if sharded else {}))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == sharded
    name = "model.multi_modal_projector.linear_1.weight"
    holder = next(path for path in files if name in load_file(path))
    tensors = load_file(holder)
    tensors[name] = tensors[name].half()  # another floating-point dtype: the same numbers
    rewrite_weights(holder, tensors)
    reloaded = Cell2TextForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded.state_dict()[name], tensors[name].float())
    tensors[name] = (tensors[name] * 100).to(torch.int32)
    rewrite_weights(holder, tensors)
    with pytest.raises(OSError, match=rf"hold 1 tensors that are no floating-point numbers, e.g. {name} \(I32\)"):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)


def test_a_generation_config_that_does_not_read_is_refused_not_dropped(tmp_path):
    """The QA finding: a malformed generation_config.json was replaced by defaults with a log line (the folder's
    max_new_tokens, eos token and other settings dropped)."""
    model = tiny_model()
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path)
    assert Cell2TextForConditionalGeneration.from_pretrained(tmp_path).generation_config.max_new_tokens == 7
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(OSError, match="generation_config.json' is not a valid JSON file"):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)
    for content, kind in (("[7]", "list"), ("null", "null")):  # a TypeError traceback ("is not a mapping")
        (tmp_path / "generation_config.json").write_text(content)
        with pytest.raises(ValueError, match=f"the generation_config.json of {tmp_path} holds a JSON {kind}, not an"):
            Cell2TextForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize(("setting", "message"), [
    # transformers kept (or, with _from_model_config, dropped) the key: descriptions ran at the default length
    ({"max_new_token": 5}, r"'max_new_token' \(did you mean 'max_new_tokens'\?\) in the generation_config.json"),
    ({"num_beam": 3}, r"'num_beam' \(did you mean 'num_beams'\?\)"),
    ({"max_new_tokens": "abc"}, r"max_new_tokens must be an integer >= 0, got 'abc' \(str\)"),  # a TypeError
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),  # one token written
    ({"num_beams": 2.5}, "num_beams must be an integer"),
    ({"do_sample": "false"}, "do_sample must be true or false, got 'false'"),  # sampled
])
def test_a_generation_config_with_an_unknown_or_mistyped_setting_is_refused_by_name(tmp_path, setting, message):
    tiny_model().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, **setting}))
    with pytest.raises(ValueError, match=message):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path)


def test_a_dtype_name_that_is_no_torch_dtype_is_refused_naming_the_valid_ones(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    for key in ("dtype", "torch_dtype"):
        with pytest.raises(ValueError, match=f"{key} passed to from_pretrained is 'bfloat', which names no torch dtype: "
                                             "use float32, bfloat16 or float16 \\(or 'auto'"):
            Cell2TextForConditionalGeneration.from_pretrained(tmp_path, **{key: "bfloat"})
    assert Cell2TextForConditionalGeneration.from_pretrained(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_generate_refuses_a_setting_of_the_wrong_type():
    with pytest.raises(ValueError, match="do_sample must be true or false, got 'false' .* in the call to generate"):
        tiny_model().generate(**cell_batch(), do_sample="false", max_new_tokens=2)


def test_a_model_and_its_base_model_load_from_each_others_folders(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "full")
    model.model.save_pretrained(tmp_path / "base")
    assert isinstance(Cell2TextModel.from_pretrained(tmp_path / "full"), Cell2TextModel)
    assert isinstance(Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "base"),
                      Cell2TextForConditionalGeneration)  # the head is tied to the embeddings: nothing missing


def test_a_folder_with_a_peft_adapter_beside_the_weights_is_refused(tmp_path):
    """The QA finding: adapter files left in a model folder were applied on top of the merged weights (scores
    moved, one cell changed type), exit 0."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    for path in (tmp_path / "adapter").iterdir():
        shutil.copy(path, tmp_path / "model" / path.name)
    with pytest.raises(OSError, match="holds a PEFT adapter \\(adapter_config.json\\) beside the model weights"):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "model")


def test_a_config_size_the_weights_do_not_have_is_one_error_naming_the_tensors(tmp_path):
    """The reviewer's finding: text_config.vocab_size edited in config.json gave transformers' RuntimeError about
    ignore_mismatched_sizes (a 31-line traceback in the CLI) naming no tensor and no fix."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config = json.loads(config_file.read_text())
    rows = config["text_config"]["vocab_size"]
    config["text_config"]["vocab_size"] = rows + 7
    config_file.write_text(json.dumps(config))
    with pytest.raises(OSError, match=rf"do not match the sizes its config.json gives \(1 tensors, e.g. "
                                      rf"model.language_model.embed_tokens.weight \({rows}, \d+\) in the weights, "
                                      rf"\({rows + 7}, \d+\) by config.json\)"):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "model")


def test_from_pretrained_parts_loads_the_saved_weights(tmp_path):
    encoder_dir, lm_dir = save_tiny_parts(tmp_path, gene_vocab_size=64)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=400, num_cell_tokens=8, projector_hidden_size=16
    )
    encoder = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.model.gene_encoder.state_dict()[name], tensor), name
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    for name, tensor in lm.model.state_dict().items():
        if name == "embed_tokens.weight":  # resized by one row for <cell>
            assert torch.equal(model.get_input_embeddings().weight[:400], tensor)
        else:
            assert torch.equal(model.model.language_model.state_dict()[name], tensor), name
    assert model.get_input_embeddings().num_embeddings == 401
    # the projector's output starts at the scale of the LM's token embeddings (before <cell> was added)
    text_rms = lm.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert torch.allclose(model.model.multi_modal_projector.norm_2.weight, text_rms.expand(32))
    with torch.no_grad():
        features, _ = model.model.get_cell_features(**{k: v for k, v in cell_batch().items() if k.startswith("gene")})
    assert torch.allclose(features.pow(2).mean().sqrt(), text_rms, rtol=0.05)
    assert model.config.text_config.vocab_size == 401
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any(p.requires_grad for p in model.model.gene_encoder.parameters())
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("layer", [3, -4])
def test_encoder_layer_outside_hidden_states_is_rejected(layer):
    with pytest.raises(ValueError, match="gene_encoder_layer"):
        Cell2TextConfig(
            gene_encoder_config=BertConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2),
            text_config=LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1),
            gene_encoder_layer=layer,
        )


def test_frozen_encoder_stays_in_eval_mode_while_training():
    model = tiny_model()
    model.train()
    assert model.training and model.model.multi_modal_projector.training
    assert not model.model.gene_encoder.training
    unfrozen = Cell2TextForConditionalGeneration(
        Cell2TextConfig(gene_encoder_config=tiny_bert_config(50), text_config=tiny_llama_config(100),
                        freeze_gene_encoder=False)
    ).train()
    assert unfrozen.model.gene_encoder.training
    assert all(p.requires_grad for p in unfrozen.model.gene_encoder.parameters())


def test_generation_never_emits_the_cell_placeholder():
    model = tiny_model().eval()
    model.lm_head = torch.nn.Linear(32, 100, bias=True)  # a head that always prefers the placeholder
    with torch.no_grad():
        model.lm_head.bias[CELL] = 1e4
    generated = model.generate(**cell_batch(), max_new_tokens=5, do_sample=False)
    assert not (generated[:, 7:] == CELL).any()


def value_aware_model(num_expression_bins: int = 3):
    torch.manual_seed(0)
    config = Cell2TextConfig(
        gene_encoder_config=BertConfig(**{**tiny_bert_config(50).to_dict(), "type_vocab_size": num_expression_bins + 1}),
        text_config=tiny_llama_config(100),
        num_cell_tokens=4,
        projector_hidden_size=16,
        num_expression_bins=num_expression_bins,
    )
    return Cell2TextForConditionalGeneration(config).eval()


def test_value_aware_model_reads_expression_bins_as_token_types():
    model = value_aware_model()
    batch = cell_batch()
    low = (batch["gene_token_mask"] * 1).long()
    high = (batch["gene_token_mask"] * 3).long()
    with torch.no_grad():
        logits_low = model(**batch, gene_value_ids=low).logits
        logits_high = model(**batch, gene_value_ids=high).logits
        # the bins reach the encoder exactly as BERT token types
        manual = model.model.gene_encoder(
            input_ids=batch["gene_input_ids"], attention_mask=batch["gene_attention_mask"], token_type_ids=high,
            output_hidden_states=True,
        ).hidden_states[-2]
        features, _ = model.model.get_cell_features(
            batch["gene_input_ids"], batch["gene_attention_mask"], batch["gene_token_mask"], high
        )
    assert not torch.allclose(logits_low, logits_high)
    selected = batch["gene_token_mask"].bool() & (batch["gene_token_mask"].cumsum(1) <= 4)
    assert torch.allclose(features, model.model.multi_modal_projector(manual[selected]))
    generated = model.generate(**batch, gene_value_ids=high, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 10)


def test_expression_bins_must_match_the_model():
    batch = cell_batch()
    with pytest.raises(ValueError, match="pass gene_value_ids"):
        value_aware_model()(**batch)
    with pytest.raises(ValueError, match="rank-value tokens only"):
        tiny_model()(**batch, gene_value_ids=batch["gene_token_mask"])
    with pytest.raises(ValueError, match="type_vocab_size >= 9"):
        Cell2TextConfig(gene_encoder_config=tiny_bert_config(50), text_config=tiny_llama_config(100),
                        num_expression_bins=8)


def tiny_vocabulary(num_genes: int = 60, **source):
    """A feature extractor whose vocabulary has token ids 0..num_genes + 3, recording `source` as its origin."""
    from modeling_cell2text import Cell2TextFeatureExtractor

    extractor = Cell2TextFeatureExtractor.from_gene_medians({f"ENSG{i:011d}": 1.0 for i in range(1, num_genes + 1)})
    if source:
        extractor.vocabulary_source = source
    return extractor


def compose(encoder_dir, lm_dir, feature_extractor, **kwargs):
    return Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=400, num_cell_tokens=8, projector_hidden_size=16,
        feature_extractor=feature_extractor, **kwargs
    )


def test_composing_refuses_a_vocabulary_the_encoder_does_not_embed(tmp_path):
    encoder_dir, lm_dir = save_tiny_parts(tmp_path)  # an encoder embedding 64 gene tokens
    geneformer = {"kind": "geneformer", "token_dictionary_sha256": "a" * 64, "gene_median_sha256": "b" * 64}
    # token ids past the encoder's embeddings (68 > 64), or a smaller vocabulary (another Geneformer version)
    for num_genes in (64, 40):
        with pytest.raises(ValueError, match=r"embeds 64 tokens.*--token-dictionary .* --gene-median-file"):
            compose(encoder_dir, lm_dir, tiny_vocabulary(num_genes, **geneformer))
    # a vocabulary from a corpus's own genes, with a pretrained encoder: refused even where the sizes agree
    with pytest.raises(ValueError, match=r"derived from a corpus.*--token-dictionary .* --gene-median-file"):
        compose(encoder_dir, lm_dir, tiny_vocabulary(60, kind="corpus", genes=60))
    # the encoder's own dictionaries of the right size compose; so does an extractor saved before sources were kept
    assert compose(encoder_dir, lm_dir, tiny_vocabulary(60, **geneformer)).config.gene_encoder_layer == -2
    compose(encoder_dir, lm_dir, tiny_vocabulary(60, kind="unknown"))


def test_an_encoder_prepared_on_a_corpus_takes_that_vocabulary_only_and_is_read_at_its_trained_layer(tmp_path):
    from training.gene_encoder import record_preparation

    encoder_dir, lm_dir = save_tiny_parts(tmp_path)
    corpus_vocabulary = tiny_vocabulary(60, kind="corpus", corpus="tiny")
    config = AutoConfig.from_pretrained(encoder_dir)
    record_preparation(config, corpus_vocabulary, corpus_fingerprints={"train": "abc"})
    config.save_pretrained(encoder_dir)

    model = compose(encoder_dir, lm_dir, corpus_vocabulary).eval()
    assert model.config.gene_encoder_layer == -1  # the layer it was trained at, not the default -2
    batch = {k: v for k, v in cell_batch().items() if k.startswith("gene")}
    with torch.no_grad():
        features, _ = model.model.get_cell_features(**batch)
        last = model.model.gene_encoder(input_ids=batch["gene_input_ids"],
                                        attention_mask=batch["gene_attention_mask"]).last_hidden_state
    selected = batch["gene_token_mask"].bool() & (batch["gene_token_mask"].cumsum(1) <= 8)
    assert torch.allclose(features, model.model.multi_modal_projector(last[selected]))
    assert compose(encoder_dir, lm_dir, corpus_vocabulary, gene_encoder_layer=2).config.gene_encoder_layer == -1
    with pytest.raises(ValueError, match="trained to be read at hidden state -1.*Leave gene_encoder_layer .*unset"):
        compose(encoder_dir, lm_dir, corpus_vocabulary, gene_encoder_layer=-2)
    with pytest.raises(ValueError, match="gene_encoder_layer=5 is outside the encoder's hidden states"):
        compose(encoder_dir, lm_dir, corpus_vocabulary, gene_encoder_layer=5)  # the same state modulo 3: was taken
    # another corpus's vocabulary of the same size, or a Geneformer one, would index the wrong embeddings
    other = tiny_vocabulary(60, kind="corpus", corpus="other")
    other.gene_token_ids = {**other.gene_token_ids, "ENSG00000000001": 5, "ENSG00000000002": 4}
    with pytest.raises(ValueError, match="prepared on another gene vocabulary"):
        compose(encoder_dir, lm_dir, other)


def test_reading_an_inner_encoder_layer_leaves_the_model_whole():
    """The encoder runs only up to the layer the projector reads; it used to cut the model's own layer list for the
    call, so another thread's call meanwhile read the wrong layer and a save meanwhile lost the layers above."""
    model = tiny_model().eval()
    layers = model.model.gene_encoder.encoder.layer
    read = model.config.gene_encoder_layer % (len(layers) + 1)
    assert 0 < read < len(layers)  # an inner layer: the layers above it are not run
    seen, ran = [], []
    layers[0].register_forward_hook(lambda *_: seen.append(len(model.model.gene_encoder.encoder.layer)))
    for index, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, index=index: ran.append(index))
    batch = cell_batch()
    with torch.no_grad():
        states, _ = model.model.get_gene_states(batch["gene_input_ids"], batch["gene_attention_mask"],
                                                batch["gene_token_mask"])
        hidden = model.model.gene_encoder(input_ids=batch["gene_input_ids"],
                                          attention_mask=batch["gene_attention_mask"],
                                          output_hidden_states=True).hidden_states
    assert seen[0] == len(layers)  # the model's own list stayed whole during the call
    assert ran[: read] == list(range(read)) and ran[read] == 0  # the first call ran layers 0..read-1 only
    torch.testing.assert_close(states, hidden[read], rtol=0, atol=0)


@pytest.mark.parametrize("hooked", ["model", "encoder"])
def test_an_encoder_with_a_replaced_forward_is_read_at_its_layer(hooked):
    """A reviewer's finding: accelerate's hooks (a device map spanning devices, offloading) replace a module's
    forward by one bound to the module itself, so a view of the BERT ran the whole original: the last layer's states
    instead of config.gene_encoder_layer's, exit 0."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = tiny_model().eval()
    encoder = model.model.gene_encoder
    add_hook_to_module(encoder if hooked == "model" else encoder.encoder, ModelHook())
    read = model.config.gene_encoder_layer % (len(encoder.encoder.layer) + 1)
    batch = cell_batch()
    with torch.no_grad():
        states, _ = model.model.get_gene_states(batch["gene_input_ids"], batch["gene_attention_mask"],
                                                batch["gene_token_mask"])
        hidden = encoder(input_ids=batch["gene_input_ids"], attention_mask=batch["gene_attention_mask"],
                         output_hidden_states=True).hidden_states
    assert not torch.equal(hidden[read], hidden[-1])
    torch.testing.assert_close(states, hidden[read], rtol=0, atol=0)


def test_without_a_gene_token_mask_every_attended_position_and_no_padding_is_a_gene():
    """Documented default of get_gene_states: padding is not a gene. Treating it as one moved the second cell's
    embedding (its mean took in 3 padding positions), exit 0."""
    model = tiny_model().eval()
    batch = cell_batch()
    genes, attention = batch["gene_input_ids"], batch["gene_attention_mask"]
    with torch.no_grad():
        _, is_gene = model.model.get_gene_states(genes, attention)
        default = model.model.get_cell_embeddings(genes, attention)
        explicit = model.model.get_cell_embeddings(genes, attention, attention)
    assert is_gene.tolist() == attention.bool().tolist()
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_a_text_embedding_sharing_one_coordinate_with_the_placeholder_is_not_a_placeholder():
    """From inputs_embeds, a placeholder is a position equal to the placeholder's embedding in every coordinate:
    one equal coordinate (a zero, a clipped value) is not enough, or the cell's features go to the wrong positions."""
    model = tiny_model().eval()
    batch = cell_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().clone()
    placeholder = model.get_input_embeddings().weight[CELL].detach()
    embeds[0, 0, 0] = placeholder[0]  # a text token agreeing with the placeholder in one coordinate
    positions = model.model.placeholder_positions(None, embeds)
    assert positions.tolist() == (batch["input_ids"] == CELL).tolist()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        out = model(inputs_embeds=embeds, **inputs)  # 4 and 2 placeholders for 4 and 2 cell tokens
    assert out.logits.shape == (2, 7, 100)


def test_a_callers_generation_config_suppresses_its_tokens_over_the_models_own():
    """generate reads settings as transformers merges them: the call, then the caller's generation_config, then the
    model's. Reading the model's before the caller's dropped the caller's suppressed tokens, exit 0."""
    model = tiny_model().eval()
    banned, models_own = 42, 7
    model.lm_head = torch.nn.Linear(32, 100, bias=True)  # a head that always prefers `banned`
    with torch.no_grad():
        model.lm_head.bias[banned] = 1e4
    model.generation_config.suppress_tokens = [models_own]
    config = GenerationConfig(max_new_tokens=3, do_sample=False, suppress_tokens=[banned], pad_token_id=0,
                              eos_token_id=None)
    with torch.no_grad():
        generated = model.generate(**cell_batch(), generation_config=config)
    new_tokens = generated[:, 7:]
    assert new_tokens.shape == (2, 3)
    assert not (new_tokens == banned).any()
    assert not (new_tokens == CELL).any()


def bert(**overrides) -> BertConfig:
    return BertConfig(**{**tiny_bert_config(50).to_dict(), **overrides})


def test_every_hidden_state_of_the_encoder_can_be_read():
    """hidden_states has num_layers + 1 entries: -(n + 1)..n are all valid (the last layer is n, the embeddings
    -(n + 1)); an off-by-one refused reading the last layer by its positive index."""
    for layer in (2, -3, 0, -1):
        config = Cell2TextConfig(gene_encoder_config=tiny_bert_config(50), text_config=tiny_llama_config(100),
                                 gene_encoder_layer=layer)
        assert config.gene_encoder_layer == layer


def test_expression_bins_need_a_token_type_for_every_bin_and_for_none():
    """Bins 1..B enter as BERT token types, 0 for special tokens: type_vocab_size must be at least B + 1, else the
    highest bin indexes past the token-type embeddings."""
    with pytest.raises(ValueError, match="type_vocab_size >= 4"):
        Cell2TextConfig(gene_encoder_config=bert(type_vocab_size=3), text_config=tiny_llama_config(100),
                        num_expression_bins=3)
    Cell2TextConfig(gene_encoder_config=bert(type_vocab_size=4), text_config=tiny_llama_config(100),
                    num_expression_bins=3)


def test_a_projector_dropout_of_one_is_refused():
    """Dropout 1.0 zeroes every projected feature in training: the LM would learn from no cell at all."""
    with pytest.raises(ValueError, match=r"projector_dropout must be in \[0, 1\)"):
        Cell2TextConfig(gene_encoder_config=tiny_bert_config(50), text_config=tiny_llama_config(100),
                        projector_dropout=1.0)


def test_the_encoder_layers_benchmark_refuses_zero_repeats_in_one_line(monkeypatch, capsys):
    """benchmarks/encoder_layers.py --repeats 0 built the 316M-parameter encoder, then ended in a KeyError."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("encoder_layers")
    monkeypatch.setattr(sys, "argv", ["encoder_layers.py", "--repeats", "0"])
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "--repeats" in err[-1], err
