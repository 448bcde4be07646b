"""The command's hyper-parameters as ``params.json`` (read by ``ui``), with the secrets masked.

The masking is done on the values before they are serialised, never on the JSON text: a secret holding a
character JSON escapes (``"``, ``\\``, a non-ASCII letter) reads differently in that text.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

from .config import PARAMS_FILE, Secret, load_config
from .osutil import atomic_write_json

REDACTED = "***"


def masked(value: Any, forms: Sequence[str]) -> Any:
    """``value`` (a JSON value: objects, arrays, strings, numbers) with every string, key and number that
    contains one of ``forms`` masked: the form replaced by ``***`` in a string or a key, a number replaced
    by ``***`` as a whole. Anything else is taken as its text, like ``json.dumps(default=str)`` would."""
    if isinstance(value, dict):
        return {masked(key, forms) if isinstance(key, str) else key: masked(item, forms) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(item, forms) for item in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        text = repr(value)
        return REDACTED if any(form in text for form in forms) else value
    text = value if isinstance(value, str) else str(value)
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def secret_forms_of(*secrets: Optional[Secret]) -> Tuple[str, ...]:
    """Every form the secrets can take in a hyper-parameter (as they are, percent-encoded, JSON-escaped, ...:
    see :func:`reporter.transport.secret_forms`), longest first."""
    if not any(secrets):
        return ()
    from .transport import secret_forms  # here: http.client comes with it, and most runs have no params

    forms = {form for secret in secrets if secret for form in secret_forms(secret.reveal())}
    return tuple(sorted(forms, key=len, reverse=True))


def write_params_file(run_dir: str, params: Any, *secrets: Optional[Secret]) -> Optional[str]:
    """Write ``params`` as ``params.json`` in ``run_dir`` with every form of each secret masked; None when
    written, else why not (the run goes on without the file)."""
    try:
        atomic_write_json(os.path.join(run_dir, PARAMS_FILE), masked(params, secret_forms_of(*secrets)))
    except (OSError, ValueError) as exc:
        return str(exc)
    except RecursionError:
        return "the hyper-parameters are nested too deeply to write"
    return None


def masked_for_this_task(params: Any) -> Any:
    """``params`` with the task's key and token (from the environment) masked in every form: what an
    integration writes to ``params.json`` from the training process."""
    config, _ = load_config()
    return masked(params, secret_forms_of(config.secret_key, config.auth_token))
