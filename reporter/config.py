"""Environment variable names, defaults and the validated run configuration.

It imports only :mod:`reporter.checks` (a leaf: the validators of numbers, durations and text files)
and does no I/O at import time. Every value the agent reads from the environment is named here, once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Tuple

from .checks import ConfigError, parse_duration, parse_number

# --- environment variable names -------------------------------------------------------------------
ENV_TASK_ID = "ANYLEARN_TASK_ID"
ENV_TASK_ID_PLATFORM = "task_id"
ENV_SECRET_KEY = "ANYLEARN_SECRET_KEY"
ENV_SECRET_KEY_PLATFORM = "secret_key"
ENV_BACKEND_URL = "ANYLEARN_BACKEND_URL"
ENV_BACKEND_NAMESPACE = "BACKEND_NAMESPACE"
ENV_REPORTER_DIR = "ANYLEARN_REPORTER_DIR"
ENV_RUN_DIR = "ANYLEARN_REPORTER_RUN_DIR"
ENV_REPORT_RANKS = "ANYLEARN_REPORT_RANKS"
ENV_OBJECTIVE_METRIC = "ANYLEARN_OBJECTIVE_METRIC"
ENV_OBJECTIVE_MODE = "ANYLEARN_OBJECTIVE_MODE"  # min|max: which way the objective is better (default: by its name)
ENV_FLUSH_TIMEOUT = "ANYLEARN_FLUSH_TIMEOUT"
ENV_REQUEST_TIMEOUT = "ANYLEARN_REQUEST_TIMEOUT"
ENV_RANK = "RANK"
ENV_SUPERVISOR_PID = "ANYLEARN_REPORTER_SUPERVISOR_PID"  # set by the wrapper for its child
ENV_AUTOLOG = "ANYLEARN_AUTOLOG"  # 1: every Python process of `run`'s command hooks the supported trainers

# wrapper
ENV_ENTRYPOINT = "ANYLEARN_ENTRYPOINT"
ENV_TRAIN_PARAMS = "ANYLEARN_TRAIN_PARAMS"
ENV_TRAIN_PARAMS_PREFIX = "ANYLEARN_TRAIN_PARAMS_PREFIX"
ENV_TRAIN_PARAMS_DELIMITER = "ANYLEARN_TRAIN_PARAMS_DELIMITER"
ENV_TRAIN_PARAMS_DELIMITER_ANYLEARN = "ANYLEARN_TRAIN_PARAMS_DELIMETER"  # AnyLearn's own spelling
ENV_ARTIFACT_IDS = "ANYLEARN_ARTIFACT_IDS"
ENV_OUTPUT = "ANYLEARN_OUTPUT"
ENV_TASK_OUTPUT_PATH = "ANYLEARN_TASK_OUTPUT_PATH"
ENV_METRIC_PATTERNS = "ANYLEARN_METRIC_PATTERNS"
ENV_GRACE_PERIOD = "ANYLEARN_GRACE_PERIOD"
ENV_DRAIN_TIMEOUT = "ANYLEARN_DRAIN_TIMEOUT"
ENV_NUM_NODES = "ANYLEARN_NUM_NODES"
ENV_NPROC_PER_NODE = "ANYLEARN_NPROC_PER_NODE"
ENV_NODE_RANK = "ANYLEARN_NODE_RANK"
ENV_NODE_RANK_GENERIC = "NODE_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"

# the user's AnyLearn login token (the SDK's name): a local task's heartbeat and log shipping, and what
# `serve` accepts as a bearer token; ANYLEARN_TOKEN is the older name `serve` read, kept as an alias
ENV_AUTH_TOKEN = "ANYLEARN_AUTH_TOKEN"
ENV_TOKEN = "ANYLEARN_TOKEN"

# sidecar
ENV_RESOURCE_INTERVAL = "ANYLEARN_RESOURCE_INTERVAL"

# metric sources (wrapper and sidecar): unchanged NNI trials, TensorBoard event files
ENV_NNI = "ANYLEARN_NNI"
ENV_EXPERIMENT_ID = "ANYLEARN_EXPERIMENT_ID"
ENV_TENSORBOARD_DIR = "ANYLEARN_TENSORBOARD_DIR"
ENV_TENSORBOARD_TAG = "ANYLEARN_TENSORBOARD_TAG"
ENV_NNI_PARAMETERS = "ANYLEARN_NNI_PARAMETERS"  # set by the wrapper for an NNI trial: its hyper-parameters
# Anyboard, the platform's curves store (Apache IoTDB): all six set = on, none = off (see reporter.anyboard.config)
ENV_ANYBOARD_HOST = "ANYLEARN_ANYBOARD_IOTDB_HOST"
ENV_ANYBOARD_PORT = "ANYLEARN_ANYBOARD_IOTDB_PORT"
ENV_ANYBOARD_USER = "ANYLEARN_ANYBOARD_IOTDB_USER"
ENV_ANYBOARD_PASSWORD = "ANYLEARN_ANYBOARD_IOTDB_PASSWORD"
ENV_USER_ID = "ANYLEARN_USER_ID"
ENV_PROJECT_ID = "ANYLEARN_PROJECT_ID"
ANYBOARD_ENV = (ENV_ANYBOARD_HOST, ENV_ANYBOARD_PORT, ENV_ANYBOARD_USER, ENV_ANYBOARD_PASSWORD, ENV_USER_ID, ENV_PROJECT_ID)

# --- defaults --------------------------------------------------------------------------------------
DEFAULT_REPORTER_DIR = "anylearn-runs"
DEFAULT_OBJECTIVE_METRIC = "metric"
DEFAULT_FLUSH_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # the total deadline of one HTTP request
BURST_GAP_S = 0.002  # reports closer together than this are a burst: in-process delivery holds back
DEFAULT_OUTPUT_DIR = "output"
DEFAULT_GRACE_PERIOD_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
DEFAULT_RESOURCE_INTERVAL_S = 10.0
DEFAULT_UI_PORT = 8090  # anylearn-reporter ui, on 127.0.0.1
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
LOCAL_HEARTBEAT_INTERVAL_S = 3.0  # a local task's heartbeat, as the SDK's agent sends it
STANDALONE_NAMESPACE = "STANDALONE"
BACKEND_URL_TEMPLATE = "http://anylearn-backend.{namespace}/api"

# --- file names inside a run directory -------------------------------------------------------------
OFFLINE_RUN_PREFIX = "offline-"  # a run directory of a run without a task id: offline-<time>-<hex>
EXIT_PENDING = 3  # sync and the sidecar: records stay pending
JOURNAL_FILE = "metrics.jsonl"
CURSOR_FILE = "cursor"
REJECTED_FILE = "rejected.jsonl"
LOCK_FILE = "deliver.lock"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
CHILD_PID_FILE = "child.pid"
RESOURCES_FILE = "resources.jsonl"
HEARTBEAT_FILE = "heartbeat.json"  # the sidecar's heartbeat state, for `status`
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
TENSORBOARD_POSITION_FILE = "tensorboard.json"  # how far each event file was read
TENSORBOARD_LOCK_FILE = "tensorboard.lock"  # one reader of the event files per run
OBJECTIVE_FILE = "objective.json"  # the objective's name and direction, when known
ATTEMPTS_FILE = "attempts.jsonl"  # one line per attempt: where it starts in the journal
PARAMS_FILE = "params.json"  # the hyper-parameters an integration recorded
JOURNAL_ONLY = "; records are only journalled until it is fixed"  # what the hook does with a problem meanwhile
NOT_SHIPPED = "; a local task's logs are not shipped until it is fixed"

# --- task states (AnyLearn) ------------------------------------------------------------------------
STATE_CREATED = 0
STATE_RUNNING = 1
STATE_SUCCESS = 2
STATE_DELETED = -1
STATE_FAIL = -2
STATE_ABORT = -3
STATE_NAMES = {0: "created", 1: "running", 2: "success", -1: "deleted", -2: "fail", -3: "abort"}


class Secret:
    """A string that never shows itself: ``repr``/``str`` print a redaction, ``reveal()`` the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself; only the HTTP layer calls this."""
        return self._value

    def hint(self) -> str:
        """A redacted description safe for humans: length and at most the last two characters."""
        tail = self._value[-2:] if len(self._value) >= 8 else ""
        return f"{len(self._value)} characters" + (f", ending in {tail!r}" if tail else "")

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        import hmac  # here: with hashlib it costs `import reporter` 4 ms, and a comparison is rare

        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):  # pickling would write the secret somewhere we do not control
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class Config:
    """The agent's configuration, resolved from the environment once."""

    task_id: Optional[str]
    secret_key: Optional[Secret] = field(repr=False)
    backend_url: Optional[str]
    backend_url_source: str
    reporter_dir: str
    run_dir: str
    report_all_ranks: bool
    objective_metric: str
    flush_timeout_s: float
    rank: int
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    objective_mode: Optional[str] = None  # "min" or "max" when ANYLEARN_OBJECTIVE_MODE says so
    auth_token: Optional[Secret] = field(default=None, repr=False)  # a local task's token (ANYLEARN_AUTH_TOKEN)

    @property
    def offline(self) -> bool:
        """True when records are only journalled: no backend or no task to report to."""
        return self.backend_url is None or not self.task_id

    def __repr__(self) -> str:
        key = "***" if self.secret_key else None
        return (
            f"Config(task_id={self.task_id!r}, secret_key={key!r}, backend_url={self.backend_url!r}, "
            f"run_dir={self.run_dir!r}, report_all_ranks={self.report_all_ranks}, "
            f"objective_metric={self.objective_metric!r}, rank={self.rank})"
        )


MAX_TASK_ID_BYTES = 255  # a file name's limit on Linux: the task id names the run directory


def task_id_problem(task_id: Optional[str], where: str = ENV_TASK_ID) -> Optional[str]:
    """Why ``task_id`` cannot be a task id (it names the run directory and travels in requests): one line,
    the id shown escaped; None when it can (or when there is none)."""
    if not task_id:
        return None
    if (task_id.startswith(".") or "/" in task_id or "\\" in task_id
            or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in task_id)
            or len(task_id.encode("utf-8", "surrogatepass")) > MAX_TASK_ID_BYTES):
        shown = task_id[:80].encode("ascii", "backslashreplace").decode("ascii")
        return (f"{where}={shown!r} cannot be a task id (a path separator, a leading dot, a control or undecodable "
                f"character, or more than {MAX_TASK_ID_BYTES} bytes); use the id AnyLearn gave")
    return None


def secret_key_problem(key: Optional[str], where: str = ENV_SECRET_KEY) -> Optional[str]:
    """Why ``key`` cannot travel in an HTTP header (a character outside Latin-1, a control character),
    in one line that never shows the key; None when it can (or when there is no key)."""
    if not key:
        return None
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        return (f"{where} holds characters an HTTP header cannot carry (only Latin-1 text can be sent); "
                "copy the task's secret key again from AnyLearn")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return f"{where} holds a control character an HTTP header cannot carry; copy the task's secret key again from AnyLearn"
    return None


def auth_token_problem(token: Optional[str], where: str = ENV_AUTH_TOKEN) -> Optional[str]:
    """Why ``token`` cannot travel in an HTTP header, in one line that never shows it; None when it can."""
    problem = secret_key_problem(token, where)
    return problem and problem.split(";")[0] + "; copy your AnyLearn token again (anyctl login)"


def auth_token_from(env: Mapping[str, str]) -> Tuple[Optional[Secret], Optional[str]]:
    """The user's token (``ANYLEARN_AUTH_TOKEN``, else ``ANYLEARN_TOKEN``) as a :class:`Secret`, and the
    problem that keeps it from being sent (then the token is None)."""
    where = ENV_AUTH_TOKEN if env.get(ENV_AUTH_TOKEN, "").strip() else ENV_TOKEN
    token = _first(env, ENV_AUTH_TOKEN, ENV_TOKEN)
    problem = auth_token_problem(token, where)
    return (Secret(token) if token and not problem else None), problem


def check_secret_key(env: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`ConfigError` when the environment's secret key cannot travel in an HTTP header."""
    _check_variable(os.environ if env is None else env, ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM, secret_key_problem)


def check_task_id(env: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`ConfigError` when the environment's task id cannot be one (see :func:`task_id_problem`)."""
    _check_variable(os.environ if env is None else env, ENV_TASK_ID, ENV_TASK_ID_PLATFORM, task_id_problem)


def _check_variable(env: Mapping[str, str], name: str, platform_name: str,
                    problem_of: Callable[[Optional[str], str], Optional[str]]) -> None:
    where = name if env.get(name, "").strip() else platform_name
    problem = problem_of(_first(env, name, platform_name), where)
    if problem:
        raise ConfigError(problem)


def _first(env: Mapping[str, str], *names: str) -> Optional[str]:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def env_task_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The task id the environment gives (``ANYLEARN_TASK_ID``, else the platform's ``task_id``), unchecked."""
    return _first(os.environ if env is None else env, ENV_TASK_ID, ENV_TASK_ID_PLATFORM)


def backend_url_problem(url: str, where: str = ENV_BACKEND_URL) -> Optional[str]:
    """Why ``url`` cannot be the backend's API base, in one line naming ``where`` and the fix; None when
    it can. A user name or password in it is never shown."""
    from urllib.parse import urlsplit  # here: `import reporter` stays cheap

    example = "set it like http://127.0.0.1:8080/api"
    try:
        if "@" in url:  # checked before parsing: a password holding '/' or '?' would split the URL elsewhere
            scheme, _, rest = url.partition("://")
            return (f"{where}={scheme + '://***@' + rest.rpartition('@')[2]!r} holds a user name or password: "
                    "the secret key is sent in its own header; remove the user:password@ part")
        parts = urlsplit(url)
        shown = url
        if parts.scheme not in ("http", "https"):
            return f"{where}={shown!r} is not an http(s) URL; {example}"
        if not parts.hostname:
            return f"{where}={shown!r} names no host; {example}"
        port = parts.port
    except ValueError as exc:  # an unclosed [IPv6 bracket, a port that is no number or out of range
        return f"{where}={url[:200]!r} cannot be read as a URL ({exc}); {example}"
    if port == 0:
        return f"{where}={shown!r}: port 0 cannot be connected to; {example}"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"{where}={shown!r} has a query or fragment, which would be dropped; give only scheme://host[:port]/path"
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in url):
        return (f"{where}={url.encode('ascii', 'backslashreplace').decode()!r} holds a space, control or non-ASCII "
                "character; percent-encode it (a space is %20)")
    return None


def check_backend_url(env: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`ConfigError` when ``ANYLEARN_BACKEND_URL`` is set and cannot work (see :func:`backend_url_problem`)."""
    url = _first(os.environ if env is None else env, ENV_BACKEND_URL)
    problem = backend_url_problem(url) if url else None
    if problem:
        raise ConfigError(problem)


def resolve_backend_url(env: Mapping[str, str], has_credentials: bool) -> Tuple[Optional[str], str]:
    """Return the API base URL and how it was found (the order is AnyLearn's own)."""
    explicit = _first(env, ENV_BACKEND_URL)
    if explicit:
        return explicit.rstrip("/"), ENV_BACKEND_URL
    namespace = _first(env, ENV_BACKEND_NAMESPACE)
    if namespace:
        return BACKEND_URL_TEMPLATE.format(namespace=namespace), ENV_BACKEND_NAMESPACE
    if has_credentials:
        return BACKEND_URL_TEMPLATE.format(namespace=STANDALONE_NAMESPACE), "AnyLearn's default (STANDALONE)"
    return None, "offline: no backend URL and no task credentials"


def offline_run_name(now: Optional[float] = None) -> str:
    """``offline-<UTC yyyymmdd-HHMMSS>-<6 hex>``, unique enough for one machine."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{OFFLINE_RUN_PREFIX}{stamp}-{os.urandom(3).hex()}"


def task_of_run_name(name: str) -> Optional[str]:
    """The task a run directory's name says it belongs to: its name, or None for an offline run."""
    return None if not name or name.startswith(OFFLINE_RUN_PREFIX) else name


def request_timeout(text: Optional[str]) -> float:
    """``ANYLEARN_REQUEST_TIMEOUT``'s value in seconds: more than 0 and finite (a request without a deadline
    could hold delivery for ever); :class:`ConfigError` otherwise."""
    return float(parse_duration(text, ENV_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_S, positive=True, unlimited=False))


def load_config(env: Optional[Mapping[str, str]] = None) -> Tuple[Config, List[str]]:
    """Resolve the configuration, replacing each invalid value by its default.

    Returns the configuration and the list of problems found (empty when all is well). The in-process
    hook warns about the problems and carries on; the CLI turns them into exit code 2 (see
    :func:`load_config_strict`).
    """
    env = os.environ if env is None else env
    problems: List[str] = []
    from .advice import say_misspelt_backend_url  # the advice module reads this one

    say_misspelt_backend_url(env)

    task_id = env_task_id(env)
    key = _first(env, ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM)
    key_problem = secret_key_problem(key, ENV_SECRET_KEY if env.get(ENV_SECRET_KEY, "").strip() else ENV_SECRET_KEY_PLATFORM)
    secret = Secret(key) if key and not key_problem else None
    token, token_problem = auth_token_from(env)
    if token_problem:
        problems.append(f"{token_problem}{NOT_SHIPPED}")
    # A token alone (a local task) goes only to a backend named for it, never to AnyLearn's guessed default.
    backend_url, source = resolve_backend_url(env, bool(task_id and key))
    if key_problem:  # a key that cannot be sent: journal only, and say so
        problems.append(f"{key_problem}{JOURNAL_ONLY}")
        backend_url, source = None, "offline: the secret key cannot be sent"
    where = ENV_BACKEND_URL if source == ENV_BACKEND_URL else f"the URL from {source}"
    url_problem = backend_url_problem(backend_url, where) if backend_url else None
    if url_problem:  # a URL that cannot work: journal only, and say so (never retry it for ever)
        problems.append(f"{url_problem}{JOURNAL_ONLY}")
        backend_url, source = None, "offline: invalid backend URL"
    id_problem = task_id_problem(task_id, ENV_TASK_ID if env.get(ENV_TASK_ID, "").strip() else ENV_TASK_ID_PLATFORM)
    if id_problem:
        problems.append(id_problem)
        task_id = None

    reporter_dir = os.path.abspath(_first(env, ENV_REPORTER_DIR) or DEFAULT_REPORTER_DIR)
    run_dir = _first(env, ENV_RUN_DIR)
    if run_dir and not os.path.isabs(run_dir):
        problems.append(f"{ENV_RUN_DIR}={run_dir!r} must be an absolute path")
        run_dir = None
    if not run_dir:
        run_dir = os.path.join(reporter_dir, task_id or offline_run_name())

    ranks = (_first(env, ENV_REPORT_RANKS) or "0").lower()
    if ranks not in ("0", "all"):
        problems.append(f"{ENV_REPORT_RANKS}={ranks!r} must be '0' (rank 0 only) or 'all'")
        ranks = "0"

    try:
        flush_timeout_s = parse_duration(_first(env, ENV_FLUSH_TIMEOUT), ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT_S)
    except ConfigError as exc:
        problems.append(str(exc))
        flush_timeout_s = DEFAULT_FLUSH_TIMEOUT_S

    try:
        request_timeout_s = request_timeout(_first(env, ENV_REQUEST_TIMEOUT))
    except ConfigError as exc:
        problems.append(str(exc))
        request_timeout_s = DEFAULT_REQUEST_TIMEOUT_S

    try:
        rank = parse_number(_first(env, ENV_RANK), ENV_RANK, 0, integer=True, minimum=0)
    except ConfigError as exc:
        problems.append(f"{exc}; treating this process as rank 0")
        rank = 0

    objective_mode = (_first(env, ENV_OBJECTIVE_MODE) or "").strip().lower() or None
    if objective_mode not in (None, "min", "max"):
        problems.append(f"{ENV_OBJECTIVE_MODE}={objective_mode!r} must be 'min' or 'max'")
        objective_mode = None

    config = Config(
        task_id=task_id,
        secret_key=secret,
        backend_url=backend_url,
        backend_url_source=source,
        reporter_dir=reporter_dir,
        run_dir=os.path.abspath(run_dir),
        report_all_ranks=ranks == "all",
        objective_metric=_first(env, ENV_OBJECTIVE_METRIC) or DEFAULT_OBJECTIVE_METRIC,
        flush_timeout_s=flush_timeout_s,
        rank=rank,
        request_timeout_s=request_timeout_s,
        objective_mode=objective_mode,
        auth_token=token,
    )
    return config, problems


def load_config_strict(env: Optional[Mapping[str, str]] = None) -> Config:
    """Like :func:`load_config`, but raise :class:`ConfigError` naming every problem."""
    config, problems = load_config(env)
    if problems:
        raise ConfigError("; ".join(p.replace(JOURNAL_ONLY, "").replace(NOT_SHIPPED, "") for p in problems))
    return config


def known_variables() -> List[str]:
    """Every environment variable the agent reads (the ``ENV_*`` names of this module)."""
    return sorted({value for name, value in globals().items() if name.startswith("ENV_") and isinstance(value, str)})
