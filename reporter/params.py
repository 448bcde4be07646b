"""Hyper-parameters -> argv: AnyLearn's ``<prefix><key><delimiter><value>`` rendering, without a shell.

Every value becomes its own argv element (or part of one with a non-space delimiter), so a value such as
``$(touch x)`` or ``a; rm -rf /`` reaches the program as the literal text it is.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional

from .config import ConfigError

_ARTIFACT_REFERENCE = re.compile(r"""^(["']?)\$(\{)?([A-Za-z_][A-Za-z0-9_]*)(?(2)\})\1$""")


def parse_params(text: str, source: str) -> Dict[str, Any]:
    """Parse a JSON object of hyper-parameters, keeping key order; ConfigError names the source and position."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to read (objects or lists within each other thousands of "
                          "levels deep); flatten it") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object like {{\"lr\": 0.01}}, not a JSON {type(value).__name__}")
    return value


def artifact_paths(artifact_ids: Optional[str], env: Mapping[str, str]) -> Dict[str, str]:
    """Artifact id -> local path, for the ids listed in ``ANYLEARN_ARTIFACT_IDS`` whose variable holds a path."""
    paths = {}
    for artifact_id in (artifact_ids or "").split(","):
        artifact_id = artifact_id.strip()
        if artifact_id and env.get(artifact_id):
            paths[artifact_id] = env[artifact_id]
    return paths


def render_value(value: Any, artifacts: Mapping[str, str]) -> str:
    """One scalar as text: strings as they are (artifact references become paths), numbers as JSON numbers,
    booleans ``true``/``false``, objects as compact JSON."""
    if isinstance(value, str):
        match = _ARTIFACT_REFERENCE.match(value)
        if match and match.group(3) in artifacts:
            return artifacts[match.group(3)]
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def render_params(
    params: Mapping[str, Any], *, prefix: str = "--", delimiter: str = " ", artifacts: Optional[Mapping[str, str]] = None
) -> List[str]:
    """The argv elements for ``params``, in their order.

    ``{"lr": 0.01, "name": "a b"}`` gives ``["--lr", "0.01", "--name", "a b"]`` with the space delimiter and
    ``["--lr=0.01", "--name=a b"]`` with ``=``. A list gives its items after one key (space delimiter) or
    joined with ``,``; null gives the key alone (a flag).
    """
    artifacts = artifacts or {}
    argv: List[str] = []
    for key, value in params.items():
        flag = f"{prefix}{key}"
        if value is None:
            argv.append(flag)
            continue
        items = [render_value(v, artifacts) for v in value] if isinstance(value, list) else [render_value(value, artifacts)]
        if delimiter == " ":
            argv.append(flag)
            argv.extend(items)
        else:
            argv.append(f"{flag}{delimiter}{','.join(items)}")
    return argv
