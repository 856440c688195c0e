"""Names shared by the engine and the judge: which components are patched, at which positions.

Torch-free, so the policy and drift code can validate a component name without loading the
engine. `docs/method.md` says what each component and position means.
"""

from __future__ import annotations

# what a patch replaces: the residual stream entering a layer, its MLP output, its attention
# output (after o_proj), or one query head's slice of the o_proj input
COMPONENTS = ("resid_pre", "mlp_out", "attn_out", "head")
# where it replaces it: the persona phrase's tokens, the last token, or every token
POSITIONS = ("identity", "last", "all")
# categories of the audit tables that are not persona categories: a `*` in a policy never
# matches them
RESERVED_CATEGORIES = ("baseline", "control", "noise_floor")
