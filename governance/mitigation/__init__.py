"""Mitigation what-if: switch off the components an audit flags, on held-out questions, and
measure what it buys (persona shift, flips) and what it costs (accuracy), against the same
number of randomly chosen components.

    from governance.mitigation import MitigationSpec, run_mitigation
    result = run_mitigation("smollm2-135m-instruct", audit, MitigationSpec(top_k=(1, 4)))
    result.curve  # shift and accuracy against k, flagged vs random

An ablation is an edit of activations at inference time: no weight of the model changes.
"""

from governance.mitigation.result import MitigationResult
from governance.mitigation.spec import METHODS, MitigationSpec


def run_mitigation(*args, **kwargs) -> MitigationResult:
    """`governance.mitigation.run.run_mitigation` (imported lazily: it needs torch)."""
    from governance.mitigation.run import run_mitigation as run

    return run(*args, **kwargs)


__all__ = ["METHODS", "MitigationResult", "MitigationSpec", "run_mitigation"]
