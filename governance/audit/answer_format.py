"""Does the prompt suit the model? No-persona accuracy per answer prefix, before any audit.

An audit reads the answer from the option-letter logits at the last position, right after
the assistant's answer prefix ("The answer is"). If a model does not expect a letter there
(it would write ":" or "**" first, or answers in another form), the letters' relative logits
are close to noise and every persona looks like it moves a third of the answers. This check
runs the no-persona prompt with each candidate prefix and reports, per prefix:

- `accuracy` (Wilson 95% interval) of the argmax over the four option letters;
- `option_mass`: the probability the model puts on the four letter tokens at all (near 1:
  the prefix makes the model answer with a letter; near 0: the letters are not what it
  would say, so their ranking says little);
- `top_token`: the most frequent next token over the questions.

    from governance.audit.answer_format import check_answer_formats
    table = check_answer_formats(loaded, questions, ["The answer is", "Answer:"])

Pick the prefix with high option mass and the best accuracy, and set `answer_prefix` in the
audit spec (per model); the rest of the prompt (instruction, chat template) is unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from governance.audit.behaviour import wilson_interval
from governance.inputs.questions import Question

FORMAT_COLUMNS = ["answer_prefix", "option_tokens", "accuracy", "ci_low", "ci_high",
                  "option_mass", "top_token", "top_token_share", "n_questions"]


def check_answer_formats(
    loaded: Any,
    questions: Sequence[Question],
    prefixes: Sequence[str],
    *,
    persona: str | None = None,
    instruction: str = "You are {persona}.",
    progress: bool = True,
) -> pd.DataFrame:
    """One row per answer prefix: accuracy, option-letter probability mass and the usual next
    token of the model on `questions` (no persona unless `persona` is given)."""
    import torch
    from tqdm.auto import tqdm

    from governance.inputs.prompts import PromptBuilder, PromptFormat
    from governance.patching.sites import last_logits

    answers = np.array([q.answer_index for q in questions])
    rows = []
    bar = tqdm(total=len(prefixes) * len(questions), desc="answer formats", unit="prompt",
               disable=not progress, leave=False)
    for prefix in prefixes:
        builder = PromptBuilder(loaded.tokenizer, PromptFormat(instruction, prefix))
        option_ids = list(builder.option_ids())
        picked, mass, top = [], [], Counter()
        for q in questions:
            ids = torch.tensor([list(builder.encode(persona, q).ids)], device=loaded.device)
            with torch.inference_mode():
                probs = last_logits(loaded.model, ids)[0].float().softmax(-1)  # (vocab,)
            option_probs = probs[option_ids]
            picked.append(int(option_probs.argmax()))
            mass.append(float(option_probs.sum()))
            top[loaded.tokenizer.decode([int(probs.argmax())])] += 1
            bar.update(1)
        correct = np.array(picked) == answers
        low, high = wilson_interval(int(correct.sum()), len(questions))
        token, count = top.most_common(1)[0]
        rows.append({
            "answer_prefix": prefix,
            "option_tokens": " ".join(repr(loaded.tokenizer.decode([i])) for i in option_ids),
            "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high,
            "option_mass": float(np.mean(mass)), "top_token": token,
            "top_token_share": count / len(questions), "n_questions": len(questions),
        })
    bar.close()
    return pd.DataFrame(rows, columns=FORMAT_COLUMNS)
