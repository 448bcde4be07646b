"""The launch: what runs, with which argv and environment, checked before anything is reported.

Every option of ``run`` becomes a field of :class:`RunOptions` in :func:`options_from` (the one place that
reads the command line and the environment for the wrapper); :func:`build_argv` turns them into the
child's argv (hyper-parameters, torchrun for a distributed run), :func:`child_environment` into its
environment. :func:`check_launchable`, :func:`prepare_run_dir` and :func:`prepare_output_dir` raise
:class:`~reporter.config.ConfigError` (exit 2, one line) for whatever would fail at launch.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..checks import option_or_env, parse_duration, parse_number, read_text_file
from ..config import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_OUTPUT_DIR,
    ENV_ARTIFACT_IDS,
    ENV_AUTH_TOKEN,
    ENV_DRAIN_TIMEOUT,
    ENV_ENTRYPOINT,
    ENV_EXPERIMENT_ID,
    ENV_GRACE_PERIOD,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRIC_PATTERNS,
    ENV_NODE_RANK,
    ENV_NODE_RANK_GENERIC,
    ENV_NPROC_PER_NODE,
    ENV_NUM_NODES,
    ENV_OUTPUT,
    ENV_REPORTER_DIR,
    ENV_RUN_DIR,
    ENV_SECRET_KEY,
    ENV_SECRET_KEY_PLATFORM,
    ENV_SUPERVISOR_PID,
    ENV_TASK_OUTPUT_PATH,
    ENV_TENSORBOARD_DIR,
    ENV_TENSORBOARD_TAG,
    ENV_TOKEN,
    ENV_TRAIN_PARAMS,
    ENV_TRAIN_PARAMS_DELIMITER,
    ENV_TRAIN_PARAMS_DELIMITER_ANYLEARN,
    ENV_TRAIN_PARAMS_PREFIX,
    JOURNAL_FILE,
    Config,
    ConfigError,
    Secret,
)
from ..integrations.autolog import autolog_environment, autolog_requested
from ..log import get_logger
from ..nni_trial import nni_enabled, nni_environment, nni_version_problem
from ..params import artifact_paths, parse_params, render_params
from ..tbevents import tensorboard_directory

_PYTHON_NAME = re.compile(r"^python[0-9.]*$")


# --- options ----------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything ``run`` needs, validated."""

    command: List[str]
    params_argv: List[str]
    output_dir: str
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    metric_patterns: List["re.Pattern[str]"] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[str] = None
    isolate_secret: bool = False
    dry_run: bool = False
    autolog: bool = False  # integrations: hook the command's trainers (reporter.integrations.autolog)
    # metric sources (reporter/nni_trial.py, reporter/tbevents.py)
    params: Dict[str, Any] = field(default_factory=dict)
    nni: bool = False
    tensorboard_dir: Optional[str] = None
    tensorboard_tag: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.nnodes * self.nproc_per_node > 1


def compile_metric_patterns(patterns: List[str]) -> List["re.Pattern[str]"]:
    """Compile user metric patterns; each needs a named group ``value`` (``name`` and ``step`` optional)."""
    compiled = []
    for text in patterns:
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise ConfigError(f"metric pattern {text!r} is not a valid regular expression: {exc}") from None
        if "value" not in pattern.groupindex:
            raise ConfigError(f"metric pattern {text!r} needs a named group (?P<value>...)")
        compiled.append(pattern)
    return compiled


def output_directory(path: str) -> str:
    """Check AnyLearn's rule for the output directory (relative, no ``..``) and return it absolute."""
    if os.path.isabs(path):
        raise ConfigError(f"the output directory {path!r} must be a relative path (AnyLearn collects it from the working directory)")
    if ".." in path.replace("\\", "/").split("/"):
        raise ConfigError(f"the output directory {path!r} must not contain '..'")
    if not path.strip():
        raise ConfigError("the output directory is empty; give a relative path such as 'output'")
    return os.path.abspath(path)


def options_from(args: Any, env: Mapping[str, str]) -> RunOptions:
    """Build :class:`RunOptions` from parsed arguments and the environment; ConfigError on any problem."""
    if args.command:
        command = list(args.command)
    elif env.get(ENV_ENTRYPOINT, "").strip():
        try:
            command = shlex.split(env[ENV_ENTRYPOINT])
        except ValueError as exc:
            raise ConfigError(f"{ENV_ENTRYPOINT} cannot be split into words: {exc}") from None
    else:
        raise ConfigError(
            f"no command to run: give one after '--' (anylearn-reporter run -- python train.py) or set {ENV_ENTRYPOINT}"
        )

    if args.params is not None and args.params_file is not None:
        raise ConfigError("give --params or --params-file, not both")
    if args.params_file is not None:
        params = parse_params(read_text_file(args.params_file, "--params-file"), f"--params-file {args.params_file}")
    elif args.params is not None:
        params = parse_params(args.params, "--params")
    else:
        params = parse_params(env.get(ENV_TRAIN_PARAMS, ""), ENV_TRAIN_PARAMS)
    prefix = option_or_env(args.params_prefix, env, ENV_TRAIN_PARAMS_PREFIX)
    delimiter = option_or_env(args.params_delimiter, env, ENV_TRAIN_PARAMS_DELIMITER, ENV_TRAIN_PARAMS_DELIMITER_ANYLEARN)
    params_argv = render_params(
        params,
        prefix="--" if prefix is None else prefix,
        delimiter=" " if delimiter is None else delimiter,
        artifacts=artifact_paths(env.get(ENV_ARTIFACT_IDS), env),
    )

    patterns = list(args.metric_pattern or [])
    patterns += [line for line in env.get(ENV_METRIC_PATTERNS, "").splitlines() if line.strip()]

    options = RunOptions(
        command=command,
        params_argv=params_argv,
        output_dir=output_directory(option_or_env(args.output, env, ENV_OUTPUT) or DEFAULT_OUTPUT_DIR),
        grace_period_s=parse_duration(option_or_env(args.grace_period, env, ENV_GRACE_PERIOD), f"--grace-period ({ENV_GRACE_PERIOD})", DEFAULT_GRACE_PERIOD_S),
        drain_timeout_s=parse_duration(option_or_env(args.drain_timeout, env, ENV_DRAIN_TIMEOUT), f"--drain-timeout ({ENV_DRAIN_TIMEOUT})", DEFAULT_DRAIN_TIMEOUT_S),
        metric_patterns=compile_metric_patterns(patterns),
        nnodes=parse_number(option_or_env(args.nnodes, env, ENV_NUM_NODES), "the number of nodes", 1, integer=True, minimum=1),
        nproc_per_node=parse_number(option_or_env(args.nproc_per_node, env, ENV_NPROC_PER_NODE), "processes per node", 1, integer=True, minimum=1),
        node_rank=parse_number(option_or_env(None, env, ENV_NODE_RANK, ENV_NODE_RANK_GENERIC), "the node rank", 0, integer=True),
        master_addr=env.get(ENV_MASTER_ADDR) or None,
        master_port=env.get(ENV_MASTER_PORT) or None,
        isolate_secret=bool(args.isolate_secret),
        dry_run=bool(args.dry_run),
        autolog=autolog_requested(args, env),
    )
    # metric sources: an NNI trial's channel, TensorBoard event files
    options.params = params
    options.nni = nni_enabled(bool(getattr(args, "nni", False)), env)
    options.tensorboard_dir = tensorboard_directory(option_or_env(getattr(args, "tensorboard_dir", None), env, ENV_TENSORBOARD_DIR), options.output_dir)
    options.tensorboard_tag = option_or_env(getattr(args, "tensorboard_tag", None), env, ENV_TENSORBOARD_TAG)
    if options.node_rank >= options.nnodes:
        raise ConfigError(f"the node rank {options.node_rank} must be below the number of nodes {options.nnodes}")
    if options.distributed and importlib.util.find_spec("torch") is None:
        raise ConfigError(
            f"a distributed run ({options.nnodes} nodes x {options.nproc_per_node} processes) needs torch: "
            "pip install anylearn-reporter[distributed]"
        )
    return options


def build_argv(options: RunOptions) -> List[str]:
    """The child's argv: the command and its hyper-parameters, through torchrun for a distributed run."""
    argv = options.command + options.params_argv
    if not options.distributed:
        return argv
    launcher = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={options.nnodes}", f"--nproc-per-node={options.nproc_per_node}", f"--node-rank={options.node_rank}",
    ]
    if options.master_addr:
        launcher.append(f"--master-addr={options.master_addr}")
    if options.master_port:
        launcher.append(f"--master-port={options.master_port}")
    program = os.path.basename(argv[0])
    if _PYTHON_NAME.match(program) or os.path.realpath(argv[0]) == os.path.realpath(sys.executable):
        rest = argv[1:]
        if rest[:1] == ["-m"]:
            return launcher + ["-m"] + rest[1:]
        return launcher + rest
    return launcher + ["--no-python"] + argv


def child_environment(env: Mapping[str, str], config: Config, options: RunOptions) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The child's whole environment, and what the wrapper adds to its own (for --dry-run)."""
    added = {
        ENV_RUN_DIR: config.run_dir,
        ENV_TASK_OUTPUT_PATH: options.output_dir,
        "PYTHONUNBUFFERED": "1",
        ENV_SUPERVISOR_PID: str(os.getpid()),
        **(autolog_environment(env) if options.autolog else {}),
    }
    if options.nni:  # an unchanged NNI trial talks to reporter.nni_channel
        problem = nni_version_problem()
        if problem:
            get_logger().warning("%s", problem)
        added.update(nni_environment(options.params, task_id=config.task_id, experiment_id=env.get(ENV_EXPERIMENT_ID), output_dir=options.output_dir))
    child = {**env, **added}
    if options.isolate_secret:
        for name in (ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM, ENV_AUTH_TOKEN, ENV_TOKEN):
            child.pop(name, None)
    return child, added

def redacted(argv: List[str], *secrets: Optional[Secret]) -> List[str]:
    """``argv`` with each secret (the key, a user's token) replaced by ``***`` wherever it appears (for logs
    and files)."""
    for secret in secrets:
        if secret:
            argv = [a.replace(secret.reveal(), "***") for a in argv]
    return argv


# --- before launch ----------------------------------------------------------------------------------


def check_launchable(argv: List[str], env: Mapping[str, str]) -> None:
    """ConfigError for what ``exec`` cannot take: a NUL byte (or text the file system encoding cannot
    carry) in an argument or the environment, a ``=`` in a variable's name. Checked before anything is
    reported, so a bad hyper-parameter never leaves a task "running" at the backend."""
    for index, arg in enumerate(argv):
        problem = _unexecutable(arg)
        if problem:
            what = "the program" if index == 0 else f"argument {index} of the command"
            raise ConfigError(f"{what} ({_shown(arg)}) {problem}; fix the command or the hyper-parameters")
    for name, value in env.items():
        problem = _unexecutable(name) or ("contains '='" if "=" in name or not name else None)
        if problem:
            raise ConfigError(f"the environment variable name {_shown(name)} {problem}; remove the variable")
        problem = _unexecutable(value)
        if problem:
            raise ConfigError(f"the environment variable {name} {problem}; fix its value")


def _unexecutable(text: str) -> Optional[str]:
    if "\0" in text:
        return "contains a NUL byte, which no program can receive"
    try:
        os.fsencode(text)
    except UnicodeError:
        return "holds text the file system encoding cannot carry"
    return None


def _shown(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def prepare_run_dir(run_dir: str) -> None:
    """Make the run directory and check the journal can be created in it; ConfigError naming the path and
    the fix otherwise (a file in the way, a read-only or virtual file system, a name too long)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, JOURNAL_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            fix = f"a name in it is too long (is the task id right?): set {ENV_RUN_DIR} to a shorter absolute path"
        elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
            fix = f"a file is in the way: move it, or set {ENV_REPORTER_DIR} (or {ENV_RUN_DIR}) to another directory"
        else:
            fix = f"set {ENV_REPORTER_DIR} (or {ENV_RUN_DIR}) to a writable directory"
        raise ConfigError(f"cannot make the run directory {run_dir}: {exc.strerror}; {fix}") from None


def prepare_output_dir(path: str) -> None:
    """Make the output directory (keeping a non-empty one: a resumed task); ConfigError when it cannot be."""
    try:
        if os.path.isdir(path) and os.listdir(path):
            get_logger().info("the output directory %s already holds files (an earlier run's?): they are kept, and the "
                              "command may overwrite them", path)
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the output directory {path}: {exc.strerror}; give --output another relative path") from None

