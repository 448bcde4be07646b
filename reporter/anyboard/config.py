"""Anyboard's configuration: the six variables the platform gives a task's container, plus the task id.

All set: Anyboard is on. None set: it is off, and nothing is said. Some set: one line names what is
missing. The IoTDB password is a :class:`~reporter.config.Secret` from the moment it is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..checks import parse_number
from ..config import (
    ANYBOARD_ENV, DEFAULT_OBJECTIVE_METRIC, ENV_ANYBOARD_HOST, ENV_ANYBOARD_PASSWORD, ENV_ANYBOARD_PORT,
    ENV_ANYBOARD_USER, ENV_PROJECT_ID, ENV_TASK_ID, ENV_USER_ID, ConfigError, Secret,
)

DEFAULT_ANYBOARD_TIMEOUT_S = 10.0  # every socket operation with IoTDB (connect, one call) waits at most this


@dataclass(frozen=True)
class AnyboardConfig:
    """Where a task's curves go: the IoTDB server, its login and the task's place in the device tree."""

    host: str
    port: int
    user: str
    password: Secret = field(repr=False)
    user_id: str
    project_id: str
    task_id: str
    report_all_ranks: bool = False
    objective_metric: str = DEFAULT_OBJECTIVE_METRIC  # the name of an unnamed report
    timeout_s: float = DEFAULT_ANYBOARD_TIMEOUT_S

    @property
    def device_prefix(self) -> str:
        """``root.{user id}.{project id}.{task id}``, the SDK's own prefix."""
        return f"root.{self.user_id}.{self.project_id}.{self.task_id}"


def _value(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def anyboard_config(env: Optional[Mapping[str, str]] = None, *, task_id: Optional[str] = None,
                    report_all_ranks: bool = False,
                    objective_metric: str = DEFAULT_OBJECTIVE_METRIC) -> Optional[AnyboardConfig]:
    """Anyboard's configuration from ``env``, or None when none of its variables is set.

    ``task_id`` defaults to ``ANYLEARN_TASK_ID`` (pass the resolved :attr:`Config.task_id`). Raises
    :class:`~reporter.config.ConfigError` in one line naming every missing variable when only some are set,
    or when the port is not a port; the message never shows the password.
    """
    env = os.environ if env is None else env
    present = [name for name in ANYBOARD_ENV if _value(env, name)]
    if not present:
        return None
    task = task_id or _value(env, ENV_TASK_ID)
    missing = [name for name in ANYBOARD_ENV if name not in present] + ([] if task else [ENV_TASK_ID])
    if missing:
        raise ConfigError(
            f"Anyboard is half configured: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set "
            f"(found {', '.join(present)}); set all of them, or none to leave Anyboard off")
    for name, value in ((ENV_USER_ID, _value(env, ENV_USER_ID)), (ENV_PROJECT_ID, _value(env, ENV_PROJECT_ID)),
                        (ENV_TASK_ID, task)):
        if any(c in value for c in ".`'\"") or any(c.isspace() for c in value):
            raise ConfigError(f"{name}={value[:80]!r} cannot be a level of an IoTDB path (a dot, a quote or a space); "
                              "use the id AnyLearn gave")
    port = parse_number(_value(env, ENV_ANYBOARD_PORT), ENV_ANYBOARD_PORT, None, integer=True, minimum=1)
    if port > 65535:
        raise ConfigError(f"{ENV_ANYBOARD_PORT} must be a TCP port (1-65535), not {port}")
    return AnyboardConfig(
        host=_value(env, ENV_ANYBOARD_HOST), port=port, user=_value(env, ENV_ANYBOARD_USER),
        password=Secret(env[ENV_ANYBOARD_PASSWORD].strip()), user_id=_value(env, ENV_USER_ID),
        project_id=_value(env, ENV_PROJECT_ID), task_id=task, report_all_ranks=report_all_ranks,
        objective_metric=objective_metric,
    )


__all__ = ["AnyboardConfig", "anyboard_config", "DEFAULT_ANYBOARD_TIMEOUT_S"]
