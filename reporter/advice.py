"""What to tell a user about their environment: the variables they misspelt, why a run is offline, why the
backend refused the task's credentials. Messages only; :mod:`reporter.config` reads the environment."""

from __future__ import annotations

import os
from typing import List, Mapping, Optional

from .config import (
    ENV_BACKEND_NAMESPACE,
    ENV_BACKEND_URL,
    ENV_SECRET_KEY,
    ENV_SECRET_KEY_PLATFORM,
    ENV_TASK_ID,
    ENV_TASK_ID_PLATFORM,
    auth_token_from,
    env_task_id,
    known_variables,
    secret_key_problem,
    task_id_problem,
    _first,
)


def misspelt_variables(env: Mapping[str, str]) -> List[str]:
    """``"ANYLEARN_TASKID is set: did you mean ANYLEARN_TASK_ID?"`` for each set variable that is not one the
    agent reads but is close to one (an ``ANYLEARN_*`` name, or a spelling of ``task_id``/``secret_key``)."""
    import difflib  # only when a run is offline or a check runs

    known = known_variables()
    by_upper = {name.upper(): name for name in known}
    hints = []
    for name in sorted(env):
        if name in known or not env.get(name, "").strip():
            continue
        upper = name.upper()
        if not upper.startswith("ANYLEARN") and not difflib.get_close_matches(upper, ["TASK_ID", "SECRET_KEY"], 1, 0.75):
            continue
        close = difflib.get_close_matches(upper, list(by_upper), 1, 0.75)
        if close:
            hints.append(f"{name} is set: did you mean {by_upper[close[0]]}?")
    return hints


def refusal(task_id: Optional[str], has_key: bool, env: Optional[Mapping[str, str]] = None) -> str:
    """Why the backend answered 401/403, naming what to check: the task id or the key when a key was sent
    (the backend cannot tell which it did not know), else the missing key and any misspelt variable set
    instead (``ANYLEARN_SECRETKEY is set: did you mean ANYLEARN_SECRET_KEY?``)."""
    hints = misspelt_variables(os.environ if env is None else env)
    if has_key:
        text = (f"the backend refused the task id or the secret key for task {task_id} (it cannot say which): check "
                f"that {task_id} is the task's id ({ENV_TASK_ID} or {ENV_TASK_ID_PLATFORM}) and {ENV_SECRET_KEY} "
                f"(or {ENV_SECRET_KEY_PLATFORM}) its key")
    else:
        text = (f"no secret key is set ({ENV_SECRET_KEY} or {ENV_SECRET_KEY_PLATFORM}) and the backend requires one "
                f"for task {task_id}: set {ENV_SECRET_KEY} (or {ENV_SECRET_KEY_PLATFORM}) to the task's key")
    return text + (" (" + "; ".join(hints) + ")" if hints else "")


def say_misspelt_backend_url(env: Mapping[str, str]) -> None:
    """Say once per process that a variable set looks like a misspelt ``ANYLEARN_BACKEND_URL`` (or
    ``BACKEND_NAMESPACE``) when the real one is not set: the run would otherwise resolve another backend."""
    if _first(env, ENV_BACKEND_URL, ENV_BACKEND_NAMESPACE):
        return
    names = (f"did you mean {ENV_BACKEND_URL}?", f"did you mean {ENV_BACKEND_NAMESPACE}?")
    near = [n for n in env if "BACKEND" in n.upper() and n not in (ENV_BACKEND_URL, ENV_BACKEND_NAMESPACE)]
    if not near:  # the common case costs no difflib
        return
    from .log import say_once

    for hint in misspelt_variables({n: env[n] for n in near}):
        if hint.endswith(names):
            say_once(("misspelt", hint), "%s", hint)


def offline_reason(env: Optional[Mapping[str, str]] = None) -> str:
    """Why a run is offline, naming the variables to set (and the misspelt ones that are set instead)."""
    env = os.environ if env is None else env
    why = []
    task_id = env_task_id(env)
    if not task_id:
        why.append(f"{ENV_TASK_ID} (or {ENV_TASK_ID_PLATFORM}) is not set")
    elif task_id_problem(task_id):
        why.append(f"{ENV_TASK_ID} (or {ENV_TASK_ID_PLATFORM}) is not a valid task id")
    key = _first(env, ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM)
    if key and secret_key_problem(key):
        why.append("the secret key cannot be sent in an HTTP header")
    elif not key and not _first(env, ENV_BACKEND_URL, ENV_BACKEND_NAMESPACE):
        why.append(f"no backend is named ({ENV_BACKEND_URL} or {ENV_BACKEND_NAMESPACE}): a token alone is never sent to a "
                   "guessed host" if auth_token_from(env)[0] else f"{ENV_SECRET_KEY} (or {ENV_SECRET_KEY_PLATFORM}) is not set")
    if not why:  # the URL's own problem was said as a configuration problem
        why.append("the backend URL cannot be used")
    hints = misspelt_variables(env)
    return " and ".join(why) + (" (" + "; ".join(hints) + ")" if hints else "")
