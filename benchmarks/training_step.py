"""Seconds per training step: TRL's fused LM head vs the labelled-positions loss (`training/loss.py`).

    python benchmarks/training_step.py [--corpus outputs/demo/corpus] [--llm ~/.cache/cell2text/SmolLM2-135M-Instruct]

Builds the demo's Cell2Text (a freshly initialised 2-layer encoder, the real SmolLM2-135M-Instruct with LoRA as in
`training/configs/demo.yaml`) and times forward + backward of the same corpus batches with both loss computations,
alternating, so machine noise hits both alike, in the recipe's precision for this machine
(`training.adapters.parse_training_arguments`: bf16 autocast, or float32 on a CPU without native bf16 kernels, where
bf16 is tens of times slower; `--bf16` forces bf16), which it prints. Prints each path's median step time and
the ratio, checks the two losses agree, and times the collator on the same rows (corpus examples -> padded tensors
with labels) to print its share of a step (target < 5%; `benchmarks/gpu.py` measures it on a GPU). Needs the demo corpus and the converted LLM (the main job makes both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "outputs" / "demo" / "corpus")
    parser.add_argument("--llm", type=Path, default=Path.home() / ".cache" / "cell2text" / "SmolLM2-135M-Instruct")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--batches", type=positive_int, default=4)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--bf16", action="store_true",
                        help="Time under bf16 autocast even where the recipe trains in float32 (a CPU without native "
                             "bf16 kernels).")
    return parser.parse_args()


def build_trainer(args: argparse.Namespace, out_dir: Path):
    from peft import LoraConfig
    from transformers import BertConfig, BertModel

    from training import sft
    from training.collator import Cell2TextDataCollator
    from training.gene_encoder import record_preparation
    from training.demo import sft_arguments

    cell2text_args, config = sft_arguments([
        "--corpus_dir", str(args.corpus), "--text_model_name_or_path", str(args.llm), "--output_dir", str(out_dir),
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--projector_dropout", "0",  # no dropout anywhere, so both paths compute the same loss
        *(["--bf16", "true"] if args.bf16 else []),  # else the recipe's choice for this machine
    ])
    config.remove_unused_columns = False
    config.dataset_kwargs = {"skip_prepare_dataset": True}
    corpus, summary = sft.load_corpus(args.corpus, cell2text_args)
    processor = sft.build_processor(cell2text_args, args.corpus, summary)
    processor.feature_extractor.num_expression_bins = 0
    encoder_dir = out_dir / "encoder"
    encoder = BertModel(BertConfig(vocab_size=processor.feature_extractor.vocab_size, hidden_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, type_vocab_size=1),
                        add_pooling_layer=False)
    # A random encoder built for the corpus's vocabulary, read at its last layer as a prepared one is.
    record_preparation(encoder.config, processor.feature_extractor)
    encoder.save_pretrained(encoder_dir)
    model = sft.build_model(cell2text_args, str(encoder_dir), processor)
    lora = LoraConfig(r=cell2text_args.lora_r, lora_alpha=cell2text_args.lora_alpha, lora_dropout=0.0,
                      target_modules=sft.language_model_lora_targets(model),
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    collator = Cell2TextDataCollator(processor)
    trainer = sft.Cell2TextSFTTrainer(
        model=model, args=config, data_collator=collator, train_dataset=corpus["train"], processing_class=processor,
        peft_config=lora, projector_learning_rate=1e-3, gene_encoder_learning_rate=1e-5,
    )
    examples = [[corpus["train"][i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]
                for b in range(args.batches)]
    return trainer, [collator(batch) for batch in examples], collator, examples, config.bf16


def main() -> None:
    args = parse_args()
    for path, what in ((args.corpus, "demo corpus"), (args.llm, "converted LLM")):
        if not path.exists():
            sys.exit(f"{path} not found: run the main job (bash scripts/main.sh) first to make the {what}.")
    from trl import SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer, batches, collator, examples, bf16 = build_trainer(args, Path(tmp))
        model = trainer.model.train()
        paths = {"TRL fused LM head": lambda b: SFTTrainer.compute_loss(trainer, model, b),
                 "labelled positions": lambda b: trainer.compute_loss(model, b)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        collate_times: list[float] = []
        losses: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for step, batch in enumerate(batches):
                order = list(paths.items())
                for name, loss_of in (order if step % 2 == 0 else order[::-1]):  # neither path always first
                    model.zero_grad()
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = loss_of(dict(batch))
                    loss.backward()
                    times[name].append(time.perf_counter() - start)
                    losses[name].append(loss.item())
            for batch_examples in examples:  # the data path: corpus rows -> padded tensors with labels
                start = time.perf_counter()
                collator(batch_examples)
                collate_times.append(time.perf_counter() - start)
    shape = tuple(batches[0]["input_ids"].shape)
    labelled = float((batches[0]["labels"] != -100).float().mean())
    precision = "bf16 autocast" if bf16 else "float32"
    print(f"batch {shape} (input_ids), {labelled:.0%} of positions labelled, {torch.get_num_threads()} threads, "
          f"{precision}")
    for name in paths:
        print(f"{name:>20}: median {statistics.median(times[name]):.2f} s/step (forward + backward, no optimizer "
              f"update) over {len(times[name])} steps")
    ratio = statistics.median(times["TRL fused LM head"]) / statistics.median(times["labelled positions"])
    print(f"speed-up: {ratio:.2f}x")
    collate = statistics.median(collate_times)
    share = collate / (collate + statistics.median(times["labelled positions"]))
    print(f"{'collator':>20}: median {collate:.3f} s/batch = {share:.2%} of a step with it (target < 5%)")
    worst = max(abs(a - b) for a, b in zip(*losses.values()))
    print(f"largest loss difference between the paths ({precision}): {worst:.2e}")


if __name__ == "__main__":
    main()
