"""``anylearn-reporter doctor``: check what a run would use and say what is wrong in plain words."""

from __future__ import annotations

import email.utils
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Mapping, Optional
from urllib.parse import urlsplit

from .advice import misspelt_variables, refusal
from .config import Config, ConfigError, check_backend_url, check_secret_key, load_config

if TYPE_CHECKING:
    from .client import BackendClient

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
CONNECT_TIMEOUT_S = 3.0
CHECK_TIMEOUT_S = 10.0
MAX_CLOCK_SKEW_S = 60.0
MIN_FREE_BYTES = 100 * 1024 * 1024


@dataclass
class Check:
    level: str
    subject: str
    text: str


def _task_checks(config: Config, problems: List[str], env: Mapping[str, str]) -> List[Check]:
    try:
        check_secret_key(env)
        key_problem = None
    except ConfigError as exc:
        key_problem = str(exc)
    checks = [Check(FAIL, "configuration", p) for p in problems if not (key_problem and p.startswith(key_problem))]
    for hint in misspelt_variables(env):
        checks.append(Check(WARN, "variable", hint))
    if config.task_id:
        checks.append(Check(OK, "task id", config.task_id))
    else:
        checks.append(Check(FAIL, "task id", "not set: export ANYLEARN_TASK_ID (AnyLearn's containers set task_id)"))
    if key_problem:
        checks.append(Check(FAIL, "secret key", key_problem))
    elif config.secret_key:
        checks.append(Check(OK, "secret key", f"found ({config.secret_key.hint()})"))
    else:
        checks.append(Check(FAIL, "secret key", "not set: export ANYLEARN_SECRET_KEY (AnyLearn's containers set secret_key)"))
    if key_problem:
        checks.append(Check(INFO, "backend", "not checked: a run would only journal until the secret key is fixed"))
    elif config.backend_url:
        checks.append(Check(OK, "backend", f"{config.backend_url} (from {config.backend_url_source})"))
    else:
        checks.append(Check(FAIL, "backend", "none: set ANYLEARN_BACKEND_URL (e.g. http://127.0.0.1:8080/api) or BACKEND_NAMESPACE"))
    return checks


def _network_checks(config: Config) -> List[Check]:
    """The route (direct or the proxy), DNS and TCP to the first hop, then the authenticated check through
    the same client a run would use (proxy, CONNECT tunnel, TLS, the deadline, no redirect followed)."""
    from .client import BackendClient

    client = BackendClient.from_config(config, request_timeout_s=CHECK_TIMEOUT_S)
    try:
        if client.setup_problem:
            return [Check(FAIL, "proxy", client.setup_problem)]
        host, port, via_proxy = client.first_hop
        backend_host = urlsplit(config.backend_url or "").hostname or ""
        if via_proxy:
            route = f"through the proxy http://{host}:{port} (NO_PROXY does not cover {backend_host})"
        else:
            route = "direct (no proxy variable applies)"
        checks = [Check(INFO, "route", route)]
        label = "proxy " if via_proxy else ""
        try:
            addresses = sorted({str(a[4][0]) for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except socket.gaierror as exc:
            return checks + [Check(FAIL, f"{label}DNS", f"cannot resolve {host}: {exc.strerror}")]
        checks.append(Check(OK, f"{label}DNS", f"{host} -> {', '.join(addresses)}"))
        try:
            start = time.monotonic()
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                pass
            checks.append(Check(OK, f"{label}TCP", f"connected to {host}:{port} in {1000 * (time.monotonic() - start):.0f} ms"))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            checks.append(Check(FAIL, f"{label}TCP", f"cannot connect to {host}:{port}: {reason}"))
            return checks
        return checks + _auth_check(config, client)
    finally:
        client.close()


def _auth_check(config: Config, client: "BackendClient") -> List[Check]:
    """An authenticated read that changes nothing: GET /train_task/final_metric?id=<task>, through the
    delivery client (so under its policy: no redirect followed, the total deadline), its answer classified
    as a delivery's would be."""
    from .client import Outcome, TransientError, classify

    try:
        answer = client.read_final_metric()
        result = classify(answer, optional_endpoint=True)
    except TransientError as exc:
        return [Check(FAIL, "auth", f"the authenticated check failed: {exc.reason}")]
    status = result.status
    if result.outcome is Outcome.REDIRECT:
        return [Check(FAIL, "backend", f"{config.backend_url} answered HTTP {status} ({result.reason}): redirects are "
                      "never followed (the secret key would go along); set ANYLEARN_BACKEND_URL to the address that answers itself")]
    if result.outcome is Outcome.AUTH:
        check = Check(FAIL, "auth", f"{refusal(config.task_id, bool(config.secret_key), {})} (HTTP {status})")
    elif result.outcome is Outcome.UNSUPPORTED:
        check = Check(INFO, "auth", f"the backend has no read endpoint to check the key with (HTTP {status})")
    elif result.outcome is Outcome.DELIVERED:
        check = Check(OK, "auth", f"the backend accepted the secret key for task {config.task_id}")
    else:
        check = Check(WARN, "auth", f"the backend answered HTTP {status}: {result.reason}")
    return [check, _clock_check(answer.header("Date"))]


def _clock_check(server_date: Optional[str]) -> Check:
    now = time.time()
    if now < 1_700_000_000:
        return Check(FAIL, "clock", f"the local clock says {time.strftime('%Y-%m-%d', time.gmtime(now))}: set the time")
    if not server_date:
        return Check(INFO, "clock", "the backend sent no Date header to compare with")
    try:
        skew = now - email.utils.parsedate_to_datetime(server_date).timestamp()
    except (TypeError, ValueError):
        return Check(INFO, "clock", f"cannot read the backend's Date header {server_date!r}")
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return Check(WARN, "clock", f"the local clock is {skew:+.0f} s off the backend's: metric times will be off")
    return Check(OK, "clock", f"within {abs(skew):.0f} s of the backend's")


def _directory_check(config: Config) -> List[Check]:
    directory = config.reporter_dir
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as exc:
        return [Check(FAIL, "reporter dir", f"{directory} is not writable ({exc.strerror}): set ANYLEARN_REPORTER_DIR")]
    free = shutil.disk_usage(directory).free
    level = OK if free >= MIN_FREE_BYTES else WARN
    return [Check(level, "reporter dir", f"{directory} is writable, {free / 1e9:.1f} GB free")]


def _optional_checks() -> List[Check]:
    checks = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        checks.append(Check(INFO, "torch", f"{torch.__version__}: distributed runs (torchrun) available"))
    else:
        checks.append(Check(INFO, "torch", "not installed: distributed runs need pip install anylearn-reporter[distributed]"))
    try:
        import pynvml

        pynvml.nvmlInit()
        checks.append(Check(INFO, "NVML", f"{pynvml.nvmlDeviceGetCount()} GPU(s) for resource sampling"))
    except ImportError:
        checks.append(Check(INFO, "NVML", "not installed: GPU sampling needs pip install anylearn-reporter[gpu]"))
    except Exception as exc:
        checks.append(Check(INFO, "NVML", f"installed, no GPU to sample ({type(exc).__name__})"))
    return checks


def run_checks(env: Optional[Mapping[str, str]] = None) -> List[Check]:
    env = os.environ if env is None else env
    config, problems = load_config(env)
    checks = _task_checks(config, problems, env)
    if config.backend_url and config.task_id:
        checks += _network_checks(config)
    checks += _directory_check(config)
    checks += _optional_checks()
    return checks


def doctor_command(env: Optional[Mapping[str, str]] = None) -> int:
    """Print one line a check; exit 0 when a run would report, 1 otherwise. A backend URL that cannot work
    is a usage error: :class:`ConfigError` (exit 2) before any check runs."""
    check_backend_url(env)
    checks = run_checks(env)
    width = max(len(c.subject) for c in checks)
    for check in checks:
        print(f"{check.level:<4}  {check.subject:<{width}}  {check.text}")
    failed = [c for c in checks if c.level == FAIL]
    if failed:
        print(f"\n{len(failed)} problem{'' if len(failed) == 1 else 's'}: a run would only journal locally until {'it is' if len(failed) == 1 else 'they are'} fixed.", file=sys.stderr)
        return 1
    print("\na run would report.")
    return 0
