"""Encoder time saved by running only the layers up to the one the projector reads (issue 23).

    python benchmarks/encoder_layers.py [--cells 8] [--genes 256] [--repeats 3]

A randomly initialised encoder of Geneformer V2-316M's shape (18 layers, width 1152), read at its second-to-last
layer (the config's default, `gene_encoder_layer=-2`): seconds per batch with the layers above it skipped (what the
model does) and with every layer run and the state indexed (what it did), alternating, best of `--repeats`, and
whether the states are identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=positive_int, default=8)
    parser.add_argument("--genes", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    from transformers import BertConfig, BertModel

    from modeling_cell2text.configuration_cell2text import GENEFORMER_V2_316M, hidden_state_index
    from modeling_cell2text.modeling_cell2text import _encoder_states

    torch.manual_seed(0)
    config = BertConfig(**GENEFORMER_V2_316M)
    encoder = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(4, config.vocab_size, (args.cells, args.genes))
    mask = torch.ones_like(ids)
    read = hidden_state_index(-2, config.num_hidden_layers)
    times = {"skipped": [], "full": []}
    with torch.no_grad():
        runs = {"skipped": lambda: _encoder_states(encoder, read, ids, mask, None),
                "full": lambda: encoder(input_ids=ids, attention_mask=mask,
                                        output_hidden_states=True).hidden_states[read]}
        states = {}
        for repeat in range(args.repeats):
            for name in (("skipped", "full") if repeat % 2 == 0 else ("full", "skipped")):  # neither always first
                start = time.perf_counter()
                states[name] = runs[name]()
                times[name].append(time.perf_counter() - start)
        skipped, full = states["skipped"], states["full"]
    best = {name: min(values) for name, values in times.items()}
    print(f"{args.cells} cells x {args.genes} genes, {config.num_hidden_layers} layers, read at hidden state {read}: "
          f"layers above skipped {best['skipped']:.2f} s, all layers {best['full']:.2f} s "
          f"({1 - best['skipped'] / best['full']:.1%} saved); states identical: {torch.equal(skipped, full)}")


if __name__ == "__main__":
    main()
