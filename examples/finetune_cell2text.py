"""Fine-tune Cell2Text with TRL, starting from a trained Cell2Text or from pretrained parts.

    # continue training the demo model, on a corpus tokenized as the model reads cells (its feature extractor):
    #   python -m processing.build_corpus --h5ad cells.h5ad --feature-extractor outputs/demo/cell2text-demo --out DIR
    python examples/finetune_cell2text.py --corpus outputs/demo/corpus --init-from outputs/demo/cell2text-demo
    # or compose a new model from a pretrained Geneformer folder and an instruct LLM
    python examples/finetune_cell2text.py --corpus DIR --gene-encoder Geneformer-V2-316M \
        --text-model meta-llama/Llama-3.2-3B-Instruct

This is training/sft.py's recipe (SFTTrainer + LoRA on the LLM + the projector trained fully) called from
Python; `python -m training.sft --config ...` runs the same from the command line or under accelerate.
"""

import sys
from pathlib import Path

# processing/ and training/ run from a checkout (they are not installed): put the checkout on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from trl import SFTConfig

from training.sft import Cell2TextArguments, main

parser = argparse.ArgumentParser()
parser.add_argument("--corpus", default="outputs/demo/corpus", help="with --init-from, built with the model's feature extractor")
parser.add_argument("--init-from", help="a trained Cell2Text folder or Hub id")
parser.add_argument("--gene-encoder", help="a pretrained Geneformer folder (with --text-model)")
parser.add_argument("--text-model", help="an instruction-tuned causal LM folder or Hub id")
parser.add_argument("--out", default="outputs/example_finetune")
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--num-cell-tokens", type=int, default=None,
                    help="soft tokens per cell of a composed model (default 32); --init-from keeps its model's")
args = parser.parse_args()
if not args.init_from and not args.text_model:
    parser.error("pass --init-from, or --text-model (and optionally --gene-encoder)")
# init_from keeps its model's; a value given with it other than the model's is refused (this script dropped it)
num_cell_tokens = 32 if args.num_cell_tokens is None and not args.init_from else args.num_cell_tokens

cell2text_args = Cell2TextArguments(
    corpus_dir=args.corpus,
    init_from=args.init_from,
    text_model_name_or_path=args.text_model,
    gene_encoder_name_or_path=args.gene_encoder,
    **({} if num_cell_tokens is None else {"num_cell_tokens": num_cell_tokens}),
)
training_args = SFTConfig(
    output_dir=args.out,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    learning_rate=1e-4,
    eval_strategy="no",
    save_steps=args.max_steps,
    logging_steps=5,
    bf16=False,
    activation_checkpointing=False,
    report_to="none",
)
final_dir = main(cell2text_args, training_args)
print(f"fine-tuned model saved to {final_dir}")
