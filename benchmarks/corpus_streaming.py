"""The training input pipeline at Census scale: a large on-disk corpus streamed through the recipe's collator (issue 21).

    python benchmarks/corpus_streaming.py [--cells 200000] [--genes-per-cell 2048] [--batch-size 32] [--batches 2000]

Writes a synthetic census-like corpus of `--cells` cells (`--genes-per-cell` gene tokens each, drawn from
Geneformer V2's 20,275-token vocabulary; descriptions rendered by the schema from CELLxGENE-like labels; every
column a build writes, as the recipe reads whole rows) to a
temporary folder with `datasets` (written batch by batch from a generator, never held in memory), then reads it as
the recipe does: memory-mapped Arrow, shuffled, through `training.collator.Cell2TextDataCollator` in a
`torch.utils.data.DataLoader` at `--batch-size`, for `--batches` batches. Prints the corpus's size on disk,
cells/s, and the process's resident heap (RssAnon) before, during (every 10% of the batches) and after, so a growth
shows, beside its mapped-file pages (RssFile: the memory-mapped corpus, which grows with the pages read and is given
back under memory pressure). The
processor's tokenizer is SmolLM2's when the main job has prepared it, else the tests' tiny one (the output says which).

One H200 trains 19.1 cells/s at 16 x 2 (docs/results.md, issue 12): the input pipeline has to stay well above that
per GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
VOCAB_SIZE = 20275  # Geneformer V2's


def rss_mb(kind: str = "RssAnon") -> float:
    """Resident memory of this process in MB: "RssAnon" (the heap: what a leak grows) or "RssFile" (pages of mapped
    files, here the memory-mapped corpus: clean, given back by the kernel under pressure)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{kind}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(folder: Path, n_cells: int, genes_per_cell: int, seed: int = 0):
    """A corpus with every column a build writes (`processing.corpus.FEATURES`: the recipe reads whole rows,
    `remove_unused_columns=False`), the metadata columns holding CELLxGENE-like labels and ids."""
    from datasets import Dataset

    from modeling_cell2text import CellDescription, render_description
    from processing.corpus import FEATURES

    labels = [("B cell", "A lymphocyte of B lineage"), ("T cell", "A type of lymphocyte"),
              ("classical monocyte", "A monocyte that has high expression of CD14"),
              ("natural killer cell", "A lymphocyte that can spontaneously kill a variety of target cells")]
    tissues, diseases = ["blood", "lung", "liver", "kidney"], ["normal", "COVID-19", "lung adenocarcinoma"]
    pathways = [f"Pathway Number {i}" for i in range(200)]

    def rows():
        rng = np.random.default_rng(seed)
        for i in range(n_cells):
            cell_type, definition = labels[i % len(labels)]
            first, second = rng.choice(len(pathways), 2, replace=False)
            labels_of_cell = {"cell_type": cell_type, "cell_type_ontology_term_id": f"CL:{i % 4:07d}",
                              "tissue": tissues[i % 4], "tissue_ontology_term_id": f"UBERON:{i % 4:07d}",
                              "disease": diseases[i % 3], "disease_ontology_term_id": f"MONDO:{i % 3:07d}",
                              "sex": ("female", "male")[i % 2], "sex_ontology_term_id": f"PATO:{383 + i % 2:07d}",
                              "development_stage": "third decade stage",
                              "development_stage_ontology_term_id": "HsapDv:0000237", "age_group": "adulthood",
                              "donor_id": f"donor_{i // 1000}", "dataset_id": f"dataset_{i // 20000}"}
            yield {
                "cell_id": f"cell_{i}",
                "gene_input_ids": [2, *rng.integers(4, VOCAB_SIZE, genes_per_cell - 2).tolist(), 3],
                "description": render_description(CellDescription(
                    cell_type=cell_type, cell_type_definition=definition, tissue=labels_of_cell["tissue"],
                    disease=labels_of_cell["disease"], sex=labels_of_cell["sex"], age_group="adulthood",
                    pathways=(pathways[first], pathways[second]))),
                "pathways": [pathways[first], pathways[second]],
                **labels_of_cell,
            }

    dataset = Dataset.from_generator(rows, features=FEATURES, cache_dir=str(folder / "cache"))
    dataset.save_to_disk(str(folder / "train"))
    del dataset
    from datasets import load_from_disk

    return load_from_disk(str(folder / "train"))


def processor_for_benchmark(num_cell_tokens: int):
    from transformers import AutoTokenizer

    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextProcessor
    from training.prepare_demo_llm import default_out_dir, is_prepared

    genes = [f"ENSG{i:011d}" for i in range(1, VOCAB_SIZE - 3)]
    extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 for g in genes})
    llm = default_out_dir()
    if is_prepared(llm):
        tokenizer, which = AutoTokenizer.from_pretrained(llm), f"SmolLM2's tokenizer ({llm})"
    else:
        from tiny_parts import make_tiny_tokenizer

        tokenizer, which = make_tiny_tokenizer(), "the tests' tiny tokenizer (run the main job for SmolLM2's)"
    return Cell2TextProcessor(extractor, tokenizer, num_cell_tokens=num_cell_tokens), which


def main() -> None:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=positive_int, default=200_000)
    parser.add_argument("--genes-per-cell", type=positive_int, default=2048)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--batches", type=positive_int, default=2000)
    parser.add_argument("--num-cell-tokens", type=positive_int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    if args.genes_per_cell < 3 or args.workers < 0:  # a cell is <cls>, its genes and <eos>
        parser.error(f"--genes-per-cell must be at least 3 and --workers at least 0, got {args.genes_per_cell} and "
                     f"{args.workers}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from training.collator import Cell2TextDataCollator

    start_rss = rss_mb()
    with tempfile.TemporaryDirectory(prefix="cell2text-stream-") as tmp:
        started = time.perf_counter()
        corpus = write_corpus(Path(tmp), args.cells, args.genes_per_cell)
        size = sum(p.stat().st_size for p in (Path(tmp) / "train").rglob("*") if p.is_file()) / 2**30
        print(f"corpus: {len(corpus):,} cells x {args.genes_per_cell} gene tokens, {size:.2f} GiB on disk, written in "
              f"{time.perf_counter() - started:.0f} s; heap {rss_mb():.0f} MB (at start {start_rss:.0f} MB)")
        processor, which = processor_for_benchmark(args.num_cell_tokens)
        print(f"processor: {which}, {args.num_cell_tokens} cell tokens")
        loader = torch.utils.data.DataLoader(
            corpus, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            collate_fn=Cell2TextDataCollator(processor), generator=torch.Generator().manual_seed(0),
        )
        every = max(1, args.batches // 10)
        rss = [rss_mb()]
        started, cells = time.perf_counter(), 0
        for step, batch in enumerate(loader, start=1):
            cells += batch["input_ids"].shape[0]
            if step % every == 0:
                rss.append(rss_mb())
                print(f"  {step:>6} batches, {cells / (time.perf_counter() - started):8.1f} cells/s, heap {rss[-1]:.0f} "
                      f"MB, mapped corpus pages {rss_mb('RssFile'):.0f} MB")
            if step >= args.batches:
                break
        seconds = time.perf_counter() - started
        print(f"{cells:,} cells in {seconds:.1f} s: {cells / seconds:.1f} cells/s through the collator at batch "
              f"{args.batch_size} ({args.workers} workers); heap (RssAnon) first {rss[0]:.0f} MB, last {rss[-1]:.0f} MB, "
              f"highest of the {len(rss)} readings {max(rss):.0f} MB (the kernel keeps no peak of RssAnon)")


if __name__ == "__main__":
    main()
