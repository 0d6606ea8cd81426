"""Where a gene vocabulary, a model and a processor meet: the checks that keep token ids pointing at the right rows.

A processor turns genes into token ids; the model's gene encoder embeds those ids. A processor from another model,
or one whose vocabulary was edited, gives exit 0 and wrong embeddings, so every place where a model and a
processor come together (the pipeline, `tl`, the CLI, `Cell2TextProcessor.from_pretrained` of a model folder)
runs `check_model_and_processor` first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# Key in the config of an encoder prepared on a corpus (`training/gene_encoder.py`): the gene vocabulary it was
# trained with (`gene_vocabulary_sha256`, its `vocabulary_source`, the corpus fingerprints), the hidden state the
# cell-type probe read (`feature_layer`) and its input (`num_expression_bins`). A pretrained Geneformer has none.
PREPARED_ENCODER_KEY = "cell2text_prepared_encoder"

# The keyword arguments of `from_pretrained` that say where a folder's or repo's files are.
HUB_KWARGS = ("cache_dir", "token", "revision", "local_files_only", "subfolder", "proxies")


def hub_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """The `HUB_KWARGS` among a `from_pretrained` call's keyword arguments (those given, not None)."""
    return {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}


def saved_file(source: Any, filename: str, hub: Mapping[str, Any]) -> str | None:
    """The local path of `filename` in a model folder or Hub repo (`hub`: `hub_kwargs`), or None where it holds
    none: one lookup for the loaders' checks, so that a repo id is checked as a folder is."""
    from transformers.utils import cached_file

    return cached_file(str(source), filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **hub)


GENEFORMER_DICTIONARIES_FIX = (
    "build the corpus with the encoder's own Geneformer dictionaries: `python -m processing.build_corpus ... "
    "--token-dictionary token_dictionary.pkl --gene-median-file gene_median_dictionary.pkl` (in Python: "
    "Cell2TextFeatureExtractor.from_geneformer_dictionaries)"
)


def gene_vocabulary_sha256(gene_token_ids: Mapping[str, int]) -> str:
    """Checksum of a gene vocabulary (gene -> token id), independent of the mapping's order."""
    canonical = json.dumps(sorted((str(k), int(v)) for k, v in gene_token_ids.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_gene_vocabulary(feature_extractor: Any, gene_encoder_config: Any, gene_encoder_name: str) -> None:
    """Refuse a feature extractor whose token ids would index the wrong rows of the encoder's gene embeddings.

    Checks the vocabulary size, and the vocabulary's origin (`feature_extractor.vocabulary_source`) against the
    encoder: an encoder prepared on a corpus must have been prepared with this very vocabulary; a pretrained
    encoder (no record) cannot read a vocabulary derived from a corpus's own genes.
    """
    source = getattr(feature_extractor, "vocabulary_source", None) or {"kind": "unknown"}
    kind = source.get("kind", "unknown")
    prepared = getattr(gene_encoder_config, PREPARED_ENCODER_KEY, None)
    if prepared is not None:
        if prepared.get("gene_vocabulary_sha256") != gene_vocabulary_sha256(feature_extractor.gene_token_ids):
            raise ValueError(
                f"The gene encoder {gene_encoder_name} was prepared on another gene vocabulary (corpus "
                f"{prepared.get('corpus_fingerprints')}, vocabulary {prepared.get('vocabulary_source')}) than this "
                f"feature extractor's ({source}): its token ids would index the wrong embeddings. Prepare the encoder "
                "on this corpus (leave gene_encoder_name_or_path unset in training/sft.py), or use the corpus it was "
                "prepared on."
            )
    elif kind == "corpus":
        raise ValueError(
            f"The feature extractor's gene vocabulary was derived from a corpus ({source}), but the gene encoder "
            f"{gene_encoder_name} is a pretrained encoder with its own vocabulary: its token ids would index the wrong "
            f"embeddings. To use this encoder, {GENEFORMER_DICTIONARIES_FIX}. Or leave gene_encoder_name_or_path "
            "unset in training/sft.py to prepare an encoder on this corpus."
        )
    encoder_vocab_size = gene_encoder_config.vocab_size
    if feature_extractor.vocab_size != encoder_vocab_size:
        raise ValueError(
            f"The feature extractor's gene vocabulary has token ids 0..{feature_extractor.vocab_size - 1} "
            f"(vocab_size {feature_extractor.vocab_size}) but the gene encoder {gene_encoder_name} embeds "
            f"{encoder_vocab_size} tokens: its token ids would index the wrong embeddings. "
            f"{GENEFORMER_DICTIONARIES_FIX[0].upper()}{GENEFORMER_DICTIONARIES_FIX[1:]}."
        )
    if prepared is None and kind == "unknown":
        logger.warning(
            "The feature extractor does not record where its gene vocabulary came from (saved before "
            "vocabulary_source existed); only its size (%d) was checked against the gene encoder %s. "
            "If the encoder is a pretrained Geneformer, %s.",
            encoder_vocab_size, gene_encoder_name, GENEFORMER_DICTIONARIES_FIX,
        )


def gene_ranking_sha256(feature_extractor: Any) -> str:
    """Checksum of how a feature extractor ranks a cell's genes besides its vocabulary: the gene medians each count
    is divided by and whether <cls>/<eos> frame the tokens. Other medians give every cell another gene order."""
    content = {"gene_medians": sorted(feature_extractor.gene_medians.items()),
               "special_tokens": feature_extractor.special_tokens}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# What each part of `processor_sha256` covers, as a mismatch names it.
PROCESSOR_PARTS = {
    "text_vocabulary": "tokenizer vocabulary (text token ids: the model would read and write other words)",
    "prompt": "chat template, system or user prompt, or definitions_in_model_text than the model was trained on",
    "gene_symbols": "gene symbol table (symbols in var_names would be read as other genes)",
    "current_gene_symbols": ("current symbol of each gene (feature extractor gene_symbols: of an input naming a gene "
                             "by its current and a previous symbol, the other column would be read)"),
    "text_tokenization": ("way of splitting text into tokens (the tokenizer's merges, normalizer or pre-tokenizer; "
                          "the vocabulary alone can be the same): the prompt and labels would be read as other "
                          "tokens"),
    "description_tokenization": ("tokens of a description the template writes (the tokenizer splits its words "
                                 "otherwise, or the description template changed since the model was saved)"),
    "prompt_tokenization": ("handling of the prompt's special tokens (an added token's lstrip, rstrip, normalized or "
                            "special flag in tokenizer.json, or split_special_tokens: the newline after <|im_end|> "
                            "eaten, the vocabulary and the template unchanged), way of splitting the template's own "
                            "text (its newlines or role names: a normalizer, pre-tokenizer or merge in tokenizer.json), "
                            "or number of cell placeholders (num_cell_tokens, edited in config.json and "
                            "processor_config.json alike): the model would read another prompt"),
    "text_decoding": ("way of decoding token ids into text (tokenizer.json's decoder, tokenizer_config.json's "
                      "clean_up_tokenization_spaces): the descriptions the model writes would read otherwise"),
    "end_of_text": ("end-of-text token (the tokenizer's eos_token, which ends every description the model learnt "
                    "to write: free descriptions ended by the model's read as cut, all unparsed)"),
    "gene_tokens_per_cell": ("number of gene tokens per cell (feature extractor model_input_size, up to the gene "
                             "encoder's positions): cells would keep another number of their top-ranked genes"),
    "labels": ("set of labels (cell types, tissues, ... with their ontology ids and definitions, pathways, age "
               "groups): a processor of another model offers labels this model did not learn to write; to choose "
               "among a subset of the model's labels, use processor.keep_labels(...)"),
}


def label_tables_sha256(processor: Any) -> str:
    """Checksum of a processor's label tables: ontology ids, cell-type definitions, pathway names and age groups."""
    content = {"ontology_term_ids": sorted((field, sorted(table.items()))
                                           for field, table in processor.ontology_term_ids.items() if table),
               "cell_type_definitions": sorted(processor.cell_type_definitions.items()),
               "pathway_names": sorted(processor.pathway_names), "age_groups": sorted(processor.age_groups)}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def processor_labels_sha256(processor: Any) -> str:
    """The checksum a model checks a processor's labels against: that of the tables a subset was chosen from
    (`Cell2TextProcessor.keep_labels`) while the processor holds that subset unchanged, else its own tables'."""
    own = label_tables_sha256(processor)
    kept = getattr(processor, "kept_labels", None) or {}
    return kept["from"] if kept.get("kept") == own else own


def holds_kept_subset(processor: Any) -> bool:
    """Whether the processor holds a subset of its labels kept with `Cell2TextProcessor.keep_labels` (unchanged since,
    and other tables than those it came from): a choice for describing some cells, not the model's labels. Tables
    changed after keeping (labels a fine-tuning added) are checked as they are (`processor_labels_sha256`)."""
    kept = getattr(processor, "kept_labels", None) or {}
    own = label_tables_sha256(processor)
    return kept.get("kept") == own and kept.get("from") != own


def kept_subset(processor: Any) -> str:
    """A subset kept with `Cell2TextProcessor.keep_labels` in words, naming the fields it narrows and the labels each
    keeps ("a subset of the model's labels (pathways: 3 kept)"), as the refusals and warning about it say: they
    counted cell types, also where only pathways or age groups were narrowed. A subset kept before keep_labels
    recorded its fields names none."""
    fields = ((getattr(processor, "kept_labels", None) or {}).get("fields")) or {}
    narrowed = "; ".join(f"{field}: {count} kept" for field, count in sorted(fields.items()))
    return f"a subset of the model's labels ({narrowed})" if narrowed else "a subset of the model's labels"


# What keeping a subset is for, and where to do it, as the refusals and warning about a model folder's subset say.
KEPT_SUBSET_FIX = ("a model folder holds the processor with the model's labels: save or upload the processor loaded "
                   "from the model's own folder, and choose among a subset where cells are described "
                   "(tl.describe(..., cell_types=[...]), cell2text describe --cell-types, or processor.keep_labels "
                   "after loading)")


# Text whose tokens show how a tokenizer splits text (capitals, digits, hyphens, commas, quotes; with
# `probe_description`, the template's words), independent of a processor's labels (a subset kept with
# `keep_labels` tokenizes the same): a tokenizer.json with other merges or a lowercasing normalizer keeps
# `get_vocab()` unchanged. Merges only a label's words use are not covered.
TOKENIZATION_PROBE = (
    'This is a CD14-positive, CD16-negative classical monocyte (CL:0000860), found in the blood of a 45-year-old '
    'female donor with COVID-19. Its most active pathways are "Antigen Processing And Presentation Of Peptide '
    'Antigen Via MHC Class II" and "Regulation Of T Cell Activation". Natural killer cell; B cell, CD19-positive; '
    'alpha-beta T cell. Healthy adult male; 3 Hypoxia 10x Genomics ÀÉ üñ.'
)

# Text chat templates write around the messages (role names, newlines, Llama 3's header), whose tokens
# `processor_sha256` records (`prompt_tokenization`): a normalizer that changed only newlines passed every other probe,
# and the model read other prompt ids.
CHAT_TEMPLATE_PROBE = "system\nuser\nassistant\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


# Text whose decoding `processor_sha256` records besides the other probes' (`text_decoding`): the spaces before
# punctuation and contractions that clean_up_tokenization_spaces takes out, which no other probe holds.
DECODING_PROBE = "Spaces before punctuation stay , . ? ! n't 'm 's 've 're as written."


def probe_description() -> str:
    """A description the template renders, whose token ids `processor_sha256` records (`description_tokenization`):
    its words ("consists", "originates") are in no probe text (one removed merge passed the probe alone)."""
    from .description_schema import AGE_GROUPS, CellDescription, render_description

    return render_description(CellDescription(
        cell_type="CD14-positive monocyte", cell_type_definition="A monocyte that expresses CD14 and is CD16-negative.",
        tissue="blood", sex="female", disease="COVID-19", age_group=AGE_GROUPS[-1],
        pathways=("Antigen Processing And Presentation", "Regulation Of T Cell Activation")))


def processor_sha256(processor: Any) -> dict[str, str]:
    """Checksums of what a processor gives the model besides its gene vocabulary and gene ranking, one per
    `PROCESSOR_PARTS` entry. Two models trained from one base LLM on one gene vocabulary (a pretrained Geneformer's)
    agree on the gene checksums, so those alone let a processor of the other model through: its tokenizer, prompt or
    labels changed every description without a word. "labels" is `processor_labels_sha256`."""
    tokenizer = processor.tokenizer
    parts = {
        "text_vocabulary": sorted(processor.tokenizer.get_vocab().items()),
        "prompt": [processor.chat_template, processor.system_prompt, processor.user_prompt,
                   bool(processor.definitions_in_model_text)],
        "gene_symbols": sorted(processor.feature_extractor.symbol_to_gene.items()),
        # a part of its own (`gene_ids.superseded_symbols` reads it): folders saved before it keep loading
        "current_gene_symbols": sorted(processor.feature_extractor.gene_symbols.items()),
        "text_tokenization": [processor.tokenizer(text, add_special_tokens=False)["input_ids"]
                              for text in (TOKENIZATION_PROBE, processor.system_prompt or "",
                                           processor.user_prompt or "")],
        # a part of its own: folders saved with text_tokenization alone keep loading
        "description_tokenization": processor.tokenizer(probe_description(), add_special_tokens=False)["input_ids"],
        # a part of its own too: folders saved before it was recorded keep loading
        "end_of_text": processor.tokenizer.eos_token_id,
        # the probes' tokens decoded as `post_process_generation` decodes what the model writes (a part of its own,
        # for the folders saved without it): a decoder rewriting words, or spaces before punctuation taken out
        "text_decoding": processor.tokenizer.batch_decode(
            [processor.tokenizer(text, add_special_tokens=False)["input_ids"]
             for text in (TOKENIZATION_PROBE, DECODING_PROBE, probe_description())], skip_special_tokens=True),
        # what splits the prompt besides its template and vocabulary (another part, for the folders saved without it);
        # not the rendered prompt's ids, which hold today's date where a template writes it (Llama 3's), but the
        # tokens of the text chat templates write between their special tokens, which no other probe holds
        "prompt_tokenization": [[(int(token_id), token.content, token.lstrip, token.rstrip, token.normalized,
                                  token.single_word, token.special)
                                 for token_id, token in sorted(tokenizer.added_tokens_decoder.items())],
                                bool(getattr(tokenizer, "split_special_tokens", False)),
                                int(processor.num_cell_tokens),
                                tokenizer(CHAT_TEMPLATE_PROBE, add_special_tokens=False)["input_ids"]],
        # as fitted to the gene encoder's positions (`fit_tokens_to_encoder`, run before any checksum is taken)
        "gene_tokens_per_cell": int(processor.feature_extractor.model_input_size),
    }
    checksums = {name: hashlib.sha256(json.dumps(content).encode()).hexdigest() for name, content in parts.items()}
    return {**checksums, "labels": processor_labels_sha256(processor)}


_WARNED_NO_LABELS: set[str] = set()  # the models `check_model_and_processor` warned about, by name


class ModelProcessorMismatchError(ValueError):
    """The processor would feed the model token ids or placeholders it was not built for."""


def check_labels(config: Any, processor: Any, model_name: str = "the model") -> None:
    """Raise `ModelProcessorMismatchError` where the processor's labels are not those the model records. A pipeline
    runs it at every call, besides `check_model_and_processor` where model and processor meet: its decoder follows
    the processor's labels as they are at the call (a subset kept later is used), so tables edited after the
    pipeline was built made it choose among labels the model never learnt. The processor's other settings are not
    checked again."""
    recorded = (getattr(config, "processor_sha256", None) or {}).get("labels")
    actual = processor_labels_sha256(processor)
    if recorded is not None and recorded != actual:
        raise ModelProcessorMismatchError(
            f"The processor's labels do not fit {model_name}: labels checksum: model {recorded}, processor {actual} "
            f"(the processor has another {PROCESSOR_PARTS['labels']}). Use the labels saved with this model.")


def fit_tokens_to_encoder(gene_encoder_config: Any, feature_extractor: Any) -> None:
    """Keep at most as many tokens per cell as the gene encoder has positions: a cell with more (its genes beyond
    the encoder's 512 positions, say, with model_input_size 4096, as processors saved before the recipe fitted
    them) failed inside BERT mid-run. It keeps its top-ranked genes, as Geneformer truncates to model_input_size."""
    positions = getattr(gene_encoder_config, "max_position_embeddings", None)
    if positions is not None and feature_extractor.model_input_size > positions:
        logger.info("model_input_size %d is above the gene encoder's %d positions: cells keep their top-ranked genes "
                    "up to %d tokens", feature_extractor.model_input_size, positions, positions)
        feature_extractor.model_input_size = positions


def recorded_gene_vocabulary_sha256(config: Any) -> str | None:
    """The gene vocabulary checksum a model config records: its own (set when the model was composed with its
    processor's feature extractor), else its corpus-prepared encoder's; None for older models without either."""
    own = getattr(config, "gene_vocabulary_sha256", None)
    if own:
        return own
    prepared = getattr(getattr(config, "gene_encoder_config", None), PREPARED_ENCODER_KEY, None) or {}
    return prepared.get("gene_vocabulary_sha256")


def check_model_and_processor(config: Any, processor: Any, model_name: str = "the model",
                              saved: bool = True) -> None:
    """Raise `ModelProcessorMismatchError` listing every way `processor` does not fit the model of `config`.

    First fits the processor's tokens per cell to the encoder's positions (`fit_tokens_to_encoder`). Checked: the
    gene vocabulary's checksum, the gene ranking's (`gene_ranking_sha256`: medians and special tokens) and the
    processor's text side, symbols and labels (`processor_sha256`), where the model records them (a warning where a
    model loaded from a folder or repo, `saved`, records no gene checksum, or no label checksum), the gene
    vocabulary's size against the encoder's embedding, the expression bins, the cell placeholder's token id, the number of cell tokens per cell, and the
    tokenizer's size against the language model's embedding.
    """
    feature_extractor = processor.feature_extractor
    fit_tokens_to_encoder(config.gene_encoder_config, feature_extractor)  # not a mismatch: cells are truncated
    problems = []
    recorded = recorded_gene_vocabulary_sha256(config)
    actual = gene_vocabulary_sha256(feature_extractor.gene_token_ids)
    if recorded is not None and recorded != actual:
        problems.append(f"gene vocabulary checksum: model {recorded}, processor {actual} (same genes under other "
                        "token ids, or other genes)")
    saved_with, ranking = getattr(config, "gene_ranking_sha256", None), gene_ranking_sha256(feature_extractor)
    if saved_with and saved_with != ranking:
        problems.append(f"gene ranking checksum: model {saved_with}, processor {ranking} (other gene medians or "
                        "special tokens than the processor saved with the model: every cell's genes would be "
                        "ranked in another order)")
    saved_parts, parts = getattr(config, "processor_sha256", None) or {}, processor_sha256(processor)
    if saved and (recorded is None or not saved_with):  # either missing: that part is not checked
        logger.warning("%s records no checksum of the gene vocabulary or ranking of the processor it was saved with "
                       "(gene_vocabulary_sha256, gene_ranking_sha256 in config.json): a processor of another model "
                       "cannot be told apart. Use the processor saved with the model.", model_name)
    elif saved and "labels" not in saved_parts and (getattr(config, "_name_or_path", "") or model_name) not in (
            _WARNED_NO_LABELS):  # once per model: it is loaded and checked in several places
        _WARNED_NO_LABELS.add(getattr(config, "_name_or_path", "") or model_name)
        logger.warning("%s records no checksum of its processor's labels (saved before they were checked): a "
                       "processor of another model with other labels cannot be told apart. Use the processor saved "
                       "with the model.", model_name)
    for name in sorted(set(saved_parts) & set(parts)):
        if saved_parts[name] != parts[name]:
            problems.append(f"{name} checksum: model {saved_parts[name]}, processor {parts[name]} (the processor "
                            f"has another {PROCESSOR_PARTS[name]})")
    encoder_vocab_size = config.gene_encoder_config.vocab_size
    if feature_extractor.vocab_size != encoder_vocab_size:
        problems.append(f"gene token ids: the processor's run to {feature_extractor.vocab_size - 1}, the gene "
                        f"encoder embeds {encoder_vocab_size} tokens")
    if feature_extractor.num_expression_bins != config.num_expression_bins:
        problems.append(f"expression bins: processor {feature_extractor.num_expression_bins}, model "
                        f"{config.num_expression_bins}")
    if processor.cell_token_id != config.cell_token_id:
        problems.append(f"cell placeholder token id: processor {processor.cell_token_id}, model {config.cell_token_id}")
    if processor.num_cell_tokens != config.num_cell_tokens:
        problems.append(f"cell tokens per cell: processor {processor.num_cell_tokens}, model {config.num_cell_tokens}")
    text_vocab_size = config.text_config.vocab_size
    if len(processor.tokenizer) > text_vocab_size:
        problems.append(f"text tokens: the tokenizer has {len(processor.tokenizer)}, the language model embeds "
                        f"{text_vocab_size}")
    if problems:
        raise ModelProcessorMismatchError(
            f"The processor does not fit {model_name}: {'; '.join(problems)}. Use the processor saved with this "
            "model (Cell2TextProcessor.from_pretrained on the model's folder or repo), or the model it was saved with."
        )
