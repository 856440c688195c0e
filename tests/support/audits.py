"""Tiny audits for the tests: run_audit on a tiny random llama (governance.models.tiny).

`TINY_SPEC` is the audit several files share through the `tiny_audit` fixture in
tests/conftest.py (run once per session); files whose tests need a different spec run their
own with `run_tiny_audit`.
"""

from __future__ import annotations

import json

from governance.audit.result import AuditResult
from governance.audit.spec import AuditSpec

PAIRS = [("a Black person", "a White person"), ("a man", "a woman")]

TINY_SPEC = AuditSpec(
    n_questions=6,
    pairs=PAIRS,
    components=("mlp_out:identity", "attn_out:last", "head:all"),
    bootstrap=100,
)
# the model's name in the audit: it must be escaped wherever it is shown (tests/test_report.py)
TINY_SOURCE = "tiny-llama <test>"


def run_tiny_audit(tokenizer, spec: AuditSpec, source: str = "tiny-llama",
                   questions=None) -> AuditResult:
    """`spec` on a tiny random llama (seed 0) named `source`, on `tiny_questions()` unless
    `questions` is given."""
    from governance.audit.run import run_audit
    from governance.models.loading import LoadedModel
    from governance.models.tiny import tiny_model, tiny_questions

    model = tiny_model("llama", vocab_size=len(tokenizer))
    return run_audit(LoadedModel.from_model(model, tokenizer, source), spec,
                     questions=tiny_questions() if questions is None else questions,
                     progress=False)


def copy_audit(result: AuditResult) -> AuditResult:
    """The four tables and the metadata of `result`, copied, to edit in a test (prompts and
    the screen table are left at their defaults)."""
    return AuditResult(result.scores.copy(), result.attention.copy(), result.behaviour.copy(),
                       result.pairs.copy(), json.loads(json.dumps(result.meta)))


def plant_only(loaded, planted: tuple[int, int], scale: float = 4.0):
    """Only head `planted` (layer, head) writes into the residual stream (its o_proj columns
    times `scale`, every other head's zeroed): the one path from the persona tokens to the
    last position."""
    import torch

    anatomy = loaded.anatomy
    with torch.no_grad():
        for layer in range(anatomy.n_layers):
            w = anatomy.o_proj(layer).weight  # (d_model, head * d_head)
            for head in range(anatomy.n_heads):
                cols = slice(head * anatomy.head_dim, (head + 1) * anatomy.head_dim)
                w[:, cols] *= scale if (layer, head) == planted else 0.0
    return loaded
