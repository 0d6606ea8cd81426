"""The schema-constrained decoder on a corpus split, against exhaustive scoring and free generation (issue 18).

    python benchmarks/schema_decoder.py [--model outputs/demo/cell2text-demo] [--corpus outputs/demo/corpus]

On every cell of the split (the main job's 70 test cells by default) it prints: how many cells get the same cell
type from the decoder (each `--searches` setting: search width `num_beams`, and `max_tree_tokens`, the size up to
which a choice's tree is scored whole) as from exhaustive scoring of every label
(`label_scoring.score_cell_types`), and where they differ whether the decoder's label has the higher
log-likelihood; cell-type accuracy of each; parse rate, invented labels and repeated pathways of the decoder and
of free greedy generation (160 new tokens, unless `--skip-free`); pathway Jaccard and F1 of both; the wall time of
each, model calls per batch and text tokens run per cell.
Needs the main job's model and corpus (`bash scripts/main.sh`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def search_setting(text: str) -> tuple[int, int]:
    """argparse type of a `--searches` value, WIDTH:MAX_TREE_TOKENS (num_beams >= 1, max_tree_tokens >= 0): a
    malformed one failed with a traceback after the model loaded and every label was scored."""
    width, colon, tree_tokens = text.partition(":")
    try:
        setting = int(width), int(tree_tokens)
    except ValueError:
        setting = None
    if not colon or setting is None or setting[0] < 1 or setting[1] < 0:
        raise argparse.ArgumentTypeError(f"expected WIDTH:MAX_TREE_TOKENS, integers >= 1 and >= 0 (e.g. 4:128), "
                                         f"got {text!r}")
    return setting


def main(argv: list[str] | None = None) -> None:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "outputs" / "demo" / "cell2text-demo")
    parser.add_argument("--corpus", type=Path, default=REPO / "outputs" / "demo" / "corpus")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--searches", nargs="+", type=search_setting, default=[(4, 128), (2, 16)],
                        metavar="WIDTH:MAX_TREE_TOKENS",
                        help="decoder settings to compare (num_beams:max_tree_tokens)")
    parser.add_argument("--skip-free", action="store_true", help="leave out free generation")
    args = parser.parse_args(argv)
    for path, option in ((args.model, "--model"), (args.corpus, "--corpus")):
        if not path.exists():  # tl.load named a missing folder as a malformed Hub repo id
            parser.error(f"{option} {path} not found: run the main job (bash scripts/main.sh) first, or pass "
                         f"{option} of a trained model and its corpus")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from datasets import load_from_disk

    from modeling_cell2text.description_schema import parse_or_none
    from modeling_cell2text.label_scoring import score_cell_types
    from modeling_cell2text.schema_decoding import SchemaDecoder
    from processing.corpus import check_corpus_tokenized_as, split_value_lists
    from training.evaluation.evaluate import batched_inputs, load_model
    from training.evaluation.metrics import pathway_report

    model, processor = load_model(args.model, device="cpu")
    check_corpus_tokenized_as(args.corpus, processor.feature_extractor, args.model)
    cells = load_from_disk(str(args.corpus))[args.split]
    values = split_value_lists(cells, processor.feature_extractor)
    true_types, true_pathways = list(cells["cell_type"]), list(cells["pathways"])
    known = {name: set(labels) for name, labels in processor.ontology_term_ids.items()}
    known["pathways"] = set(processor.pathway_names)
    batches = list(batched_inputs(model, processor, cells["gene_input_ids"], values, args.batch_size, "batches"))
    n = len(cells)
    print(f"{args.model} on {args.corpus} {args.split}: {n} cells, {len(known.get('cell_type', ()))} cell-type labels, "
          f"{len(known['pathways'])} pathway names")

    with torch.no_grad():
        start = time.perf_counter()
        exhaustive = [score_cell_types(model, processor, inputs) for inputs in batches]
        exhaustive_s = time.perf_counter() - start
    exhaustive_labels = [label for scores in exhaustive for label in scores.labels]
    print(f"exhaustive scoring of every cell-type label: {exhaustive_s:.1f} s, accuracy "
          f"{accuracy(exhaustive_labels, true_types):.3f}")

    def summary(name: str, texts: list[str], seconds: float, whole: list[bool] | None = None) -> None:
        parsed = [parse_or_none(text) if whole is None or whole[i] else None for i, text in enumerate(texts)]
        invented = sum(
            1 for d in parsed if d is not None and any(
                value is not None and value not in known.get(field, {value})
                for field, value in (("cell_type", d.cell_type), ("tissue", d.tissue), ("disease", d.disease),
                                     ("sex", d.sex))) or (d is not None and not set(d.pathways) <= known["pathways"]))
        repeated = sum(1 for d in parsed if d is not None and len(set(d.pathways)) < len(d.pathways))
        pathways = pathway_report(true_pathways, [None if d is None else d.pathways for d in parsed])
        predicted = [None if d is None else d.cell_type for d in parsed]
        print(f"{name}: {seconds:.1f} s, accuracy {accuracy(predicted, true_types):.3f}, parse rate "
              f"{sum(d is not None for d in parsed) / n:.3f}, descriptions with an invented label {invented}, with a "
              f"repeated pathway {repeated}, pathway Jaccard {pathways['jaccard']:.3f}, F1 {pathways['f1']:.3f}")

    for beams, tree_tokens in args.searches:
        decoder = SchemaDecoder(processor, num_beams=beams, max_tree_tokens=tree_tokens)
        texts, labels, scores, calls, tokens, not_proven = [], [], [], [], 0, 0
        start = time.perf_counter()
        for inputs in batches:
            described = decoder.describe(model, inputs)
            texts += described.texts
            labels += [chosen["cell_type"] for chosen in described.labels]
            scores += [score["cell_type"] for score in described.scores]
            calls.append(decoder.calls)
            tokens += decoder.tokens
            not_proven += sum(bool(choices) for choices in described.not_exact)
        seconds = time.perf_counter() - start
        summary(f"schema decoder, num_beams={beams}, max_tree_tokens={tree_tokens}", texts, seconds)
        differ = [i for i, (a, b) in enumerate(zip(labels, exhaustive_labels)) if a != b]
        better = 0
        for i in differ:
            batch_scores = exhaustive[i // args.batch_size]
            ll = batch_scores.log_likelihoods[i % args.batch_size]
            better += int(ll[batch_scores.candidates.index(labels[i])]
                          >= ll[batch_scores.candidates.index(exhaustive_labels[i])])
        # The decoder's cell_type_score counts each unexplored partial option at its prefix's probability (a
        # bound on the options under it): against exhaustive scoring's probability of the same label.
        exhaustive_scores = [score for batch in exhaustive for score in batch.scores]
        gaps = [exhaustive_scores[i] - scores[i] for i in range(n) if i not in set(differ)]
        if gaps:
            print(f"  cell_type_score below exhaustive scoring's probability of the same label by {sum(gaps) / len(gaps):.4f} "
                  f"on average (max {max(gaps):.4f}, min {min(gaps):.4f}) over {len(gaps)} cells")
        print(f"  cell type as exhaustive scoring's for {n - len(differ)} of {n} cells; where they differ, the "
              f"decoder's label is at least as likely for {better} of {len(differ)}; "
              f"{sum(calls) / len(calls):.1f} model calls per batch, {tokens / n:.0f} text tokens run per cell; "
              f"{not_proven} cells with a choice the search did not prove exact")

    if args.skip_free:
        return
    from training.evaluation.evaluate import generate_descriptions

    start = time.perf_counter()
    free, whole = generate_descriptions(model, processor, cells["gene_input_ids"], args.batch_size, 160, values)
    summary("free generation (160 new tokens)", free, time.perf_counter() - start, whole)


def accuracy(predicted, true) -> float:
    return sum(p == t for p, t in zip(predicted, true)) / max(len(true), 1)


if __name__ == "__main__":
    main()
