"""What deterministic training costs: the tiny test model trained by the recipe with and without `full_determinism`.

    python benchmarks/determinism.py [--steps 60] [--repeats 2]

Runs `training/sft.py` in-process on the tiny random parts of the tests (on a GPU where there is one), alternating
the two settings so machine noise hits both alike; prints each run's `train_runtime`, and whether the runs of one
setting (and the two settings) gave bitwise-equal weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.repeats < 2:  # one run per setting is compared with nothing: "bitwise equal: True" would say nothing
        parser.error(f"--repeats must be at least 2 (runs of one setting are compared with each other), got "
                     f"{args.repeats}")
    import torch
    from safetensors.torch import load_file
    from tiny_parts import save_tiny_corpus, save_tiny_parts
    from trl import SFTConfig

    from training.sft import Cell2TextArguments
    from training.sft import main as train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, lm_dir = save_tiny_parts(root / "parts")
        corpus_dir = save_tiny_corpus(root / "corpus", n_train=64)
        runs: dict[bool, list[tuple[float, dict]]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for full_determinism in ((False, True) if repeat % 2 == 0 else (True, False)):  # neither always first
                saved_env = dict(os.environ)
                cell2text_args = Cell2TextArguments(
                    corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
                    projector_hidden_size=16, encoder_hidden_size=16, encoder_epochs=3, encoder_candidate_layers=[1],
                    final_model_dir=str(root / f"final-{full_determinism}-{repeat}"),
                )
                config = SFTConfig(
                    output_dir=str(root / "out"), max_steps=args.steps, per_device_train_batch_size=4,
                    eval_strategy="no", save_strategy="no", bf16=False, report_to="none", seed=0,
                    use_cpu=device == "cpu", full_determinism=full_determinism, logging_steps=args.steps,
                )
                final_dir = train(cell2text_args, config)
                torch.use_deterministic_algorithms(False)  # full_determinism sets it (and env vars) process-wide
                os.environ.clear()
                os.environ.update(saved_env)
                runtime = float(__import__("json").loads((final_dir / "training_state.json").read_text())
                                ["train_runtime"])
                runs[full_determinism].append((runtime, load_file(final_dir / "model.safetensors")))

    def equal(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    print(f"device {device}, {args.steps} steps per run, torch {torch.__version__}")
    for setting, results in runs.items():
        times = [round(t, 2) for t, _ in results]
        same = all(equal(results[0][1], w) for _, w in results[1:])
        print(f"full_determinism={setting}: train_runtime {times} s, runs bitwise equal: {same}")
    print("the two settings bitwise equal:", equal(runs[False][0][1], runs[True][0][1]))


if __name__ == "__main__":
    main()
