"""persona-governance: persona-patching audits of language models.

    from governance import AuditSpec, run_audit
    result = run_audit("path/to/model", AuditSpec(questions="mmlu.jsonl", n_questions=20))
    result.scores.head()

Importing the package loads nothing heavy; names are resolved on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AuditResult", "AuditSpec", "run_audit", "__version__"]

if TYPE_CHECKING:
    from governance.audit.result import AuditResult
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec


_PUBLIC = {
    "AuditResult": "governance.audit.result",
    "AuditSpec": "governance.audit.spec",
    "run_audit": "governance.audit.run",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'governance' has no attribute {name!r}")
