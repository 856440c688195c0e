"""No-persona accuracy and option-letter mass per answer prefix, for one model.

    python docs/answer_formats.py qwen2.5-coder-0.5b-instruct docs/results/answer-formats \\
        --n-questions 40

Writes `<out>/<model>.csv` (governance.audit.answer_format). Run it before auditing a new
model: a prefix after which the model does not answer with a letter makes every persona look
like it moves the answers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

PREFIXES = ["The answer is", "The answer is:", "Answer:", "The correct option is"]


def main() -> None:
    from governance.audit.answer_format import check_answer_formats
    from governance.inputs.assets import resolve
    from governance.inputs.questions import load_questions, sample_questions
    from governance.models.loading import load_model, resolve_model

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pinned model asset, HF directory or .gguf file")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--questions", default="mmlu", help="question file or 'mmlu'")
    parser.add_argument("--n-questions", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefixes", nargs="+", default=PREFIXES)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    questions = sample_questions(load_questions(resolve(args.questions, "questions")),
                                 args.n_questions, args.seed)
    loaded = load_model(resolve_model(args.model), device="cpu")
    table = check_answer_formats(loaded, questions, args.prefixes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name.removesuffix(".gguf")
    table.to_csv(out / f"{name}.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
