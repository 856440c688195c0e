"""The audit spec the nightly runs: from the config (a file or inline), with the pinned MMLU
question set when the config names none, and the hash that identifies comparable audits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from governance.errors import ConfigError
from jobs.config import (
    NightlyConfig,
)

if TYPE_CHECKING:

    from governance.audit.spec import AuditSpec



# -- the spec -------------------------------------------------------------------------------


log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = "mmlu"  # the pinned MMLU asset: 14,042 test questions, 57 subjects


def load_spec(config: NightlyConfig) -> tuple[AuditSpec, str | None, str]:
    """The audit spec, its file text, and its hash (spec + catalogue + question file)."""
    import yaml
    from pydantic import ValidationError

    from governance.audit.spec import AuditSpec, spec_hash
    from governance.errors import format_validation_error
    from governance.inputs.assets import resolve
    from governance.inputs.personas import load_catalogue
    from governance.inputs.questions import file_sha256

    where = f"nightly config {config.source or '<defaults>'}"
    path, inline = config.spec_path(), config.inline_spec()
    if path:
        spec, text = AuditSpec.from_yaml(path), Path(path).read_text()
    elif inline is not None:
        try:
            spec = AuditSpec.model_validate(inline)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{where}: spec")) from exc
        text = yaml.safe_dump(config.spec, sort_keys=False)
    else:
        spec, text = AuditSpec(), None
    if not spec.questions:
        log.info("%s names no question set: using the pinned MMLU sample (asset 'mmlu')", where)
        spec = spec.with_overrides(questions=DEFAULT_QUESTIONS)
    questions = resolve(spec.questions, "questions")
    return spec, text, spec_hash(spec, load_catalogue(spec.personas), file_sha256(questions))
