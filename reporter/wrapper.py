"""``anylearn-reporter run``: build, launch and supervise a training command, and report for it.

One run: validate everything first (exit 2, nothing launched), prepare the output directory, take the
run's deliver lock and deliver its journal while the child runs, launch the child (argv only, its own
process group), pass its output through while logging it and reading metric lines, forward signals,
report the task state, drain, and write ``summary.json``.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .config import (
    CHILD_PID_FILE,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_OUTPUT_DIR,
    ENV_ARTIFACT_IDS,
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
    ENV_TRAIN_PARAMS,
    ENV_TRAIN_PARAMS_DELIMITER,
    ENV_TRAIN_PARAMS_DELIMITER_ANYLEARN,
    ENV_TRAIN_PARAMS_PREFIX,
    JOURNAL_FILE,
    STATE_ABORT,
    STATE_FAIL,
    STATE_NAMES,
    STATE_RUNNING,
    STATE_SUCCESS,
    STDERR_LOG,
    STDOUT_LOG,
    SUMMARY_FILE,
    Config,
    ConfigError,
    load_config_strict,
    option_or_env,
    parse_number,
)
from .integrations.autolog import autolog_environment, autolog_requested
from .journal import (
    COUNTER_UNREADABLE,
    KIND_FINAL,
    KIND_INTERMEDIATE,
    KIND_STATE,
    JournalWriter,
    atomic_write,
    atomic_write_json,
    count_pending,
)
from .log import Progress, get_logger, say_offline, warn_pending
from .nni_trial import nni_enabled, nni_environment, nni_version_problem
from .params import artifact_paths, parse_params, render_params
from .policy import SendRule
from .reaper import (
    become_subreaper,
    make_non_dumpable,
    own_children,
    reap_orphans,
    stop_leftovers,
)
from .runinfo import read_run
from .tbevents import EventFileTailer, tensorboard_directory

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STDERR_TAIL_LINES = 50
MAX_LINE_BYTES = 1 << 20
MAX_METRIC_PAYLOAD_BYTES = 64 * 1024
METRIC_PREFIX = "ANYLEARN_METRIC "
FINAL_METRIC_PREFIX = "ANYLEARN_FINAL_METRIC "
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
    # metric sources (reporter/nni_trial.py, reporter/tbevents.py)
    params: Dict[str, Any] = field(default_factory=dict)
    nni: bool = False
    tensorboard_dir: Optional[str] = None
    tensorboard_tag: Optional[str] = None
    autolog: bool = False  # integrations: hook the command's trainers (reporter.integrations.autolog)

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
        try:
            with open(args.params_file, encoding="utf-8") as f:
                params = parse_params(f.read(), f"--params-file {args.params_file}")
        except OSError as exc:
            raise ConfigError(f"cannot read --params-file {args.params_file}: {exc.strerror}") from None
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
        grace_period_s=parse_number(option_or_env(args.grace_period, env, ENV_GRACE_PERIOD), "the grace period", DEFAULT_GRACE_PERIOD_S),
        drain_timeout_s=parse_number(option_or_env(args.drain_timeout, env, ENV_DRAIN_TIMEOUT), "the drain timeout", DEFAULT_DRAIN_TIMEOUT_S),
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
        child.pop(ENV_SECRET_KEY, None)
        child.pop(ENV_SECRET_KEY_PLATFORM, None)
    return child, added


# --- metric lines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedMetric:
    kind: str
    value: float
    name: Optional[str] = None
    step: Optional[int] = None


class MetricLineParser:
    """Reads metrics from output lines: ``ANYLEARN_METRIC <value|json>``, ``ANYLEARN_FINAL_METRIC <value>``,
    and user patterns with a named group ``value`` (``name``, ``step`` optional).

    :meth:`parse` never raises, whatever the line: a metric line that cannot be used (bad JSON, a step of
    ``1e400``, nesting deeper than the parser's recursion, a payload above :data:`MAX_METRIC_PAYLOAD_BYTES`)
    is counted in :attr:`unreadable` and warned about once.
    """

    def __init__(self, patterns: List["re.Pattern[str]"], on_unreadable: Optional[Callable[[], object]] = None) -> None:
        self.patterns = patterns
        self.unreadable = 0
        self._on_unreadable = on_unreadable  # e.g. the run's host counters, so status.json shows the count

    def parse(self, line: Union[str, bytes]) -> Optional[ParsedMetric]:
        """The metric on ``line``, or None (not a metric line, or an unusable one: counted)."""
        try:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            text = text.rstrip("\r\n")
            stripped = text.strip()
            for prefix, kind in ((FINAL_METRIC_PREFIX, KIND_FINAL), (METRIC_PREFIX, KIND_INTERMEDIATE)):
                if stripped.startswith(prefix):
                    if len(stripped) - len(prefix) > MAX_METRIC_PAYLOAD_BYTES:
                        raise ValueError(f"the payload is longer than {MAX_METRIC_PAYLOAD_BYTES} bytes")
                    return self._from_payload(kind, stripped[len(prefix):])
            if len(text) > MAX_METRIC_PAYLOAD_BYTES:
                return None  # user patterns are not run over a progress bar or a binary blob
            for pattern in self.patterns:
                match = pattern.search(text)
                if match:
                    groups = match.groupdict()
                    step = groups.get("step")
                    return ParsedMetric(KIND_INTERMEDIATE, _number(groups["value"]), groups.get("name"), _step(step) if step else None)
        except Exception as exc:  # noqa: BLE001 - any line, any bytes: the reader thread must not die
            self._unreadable(exc, line)
        return None

    def _unreadable(self, exc: BaseException, line: Union[str, bytes]) -> None:
        self.unreadable += 1
        if self._on_unreadable is not None:
            try:
                self._on_unreadable()
            except Exception:  # noqa: BLE001 - counting must not stop the reader
                pass
        if self.unreadable == 1:
            try:
                shown = repr(line[:120])
            except Exception:  # noqa: BLE001
                shown = "?"
            get_logger().warning(
                "ignoring a metric line that could not be read (%s: %.200s): %s (said once; counted in summary.json)",
                type(exc).__name__, exc, shown,
            )

    @staticmethod
    def _from_payload(kind: str, payload: str) -> ParsedMetric:
        payload = payload.strip()
        if payload.startswith("{"):
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise TypeError("the payload is not a JSON object")
            step = data.get("step")
            name = data.get("name")
            return ParsedMetric(kind, _number(data["value"]), None if name is None else str(name), None if step is None else _step(step))
        return ParsedMetric(kind, _number(payload))


def _number(value: Any) -> float:
    """A metric value as a float: a JSON number or text of one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"the value must be a number, not {type(value).__name__}")
    return float(value)


def _step(value: Any) -> int:
    """A step: an integer, or text or a float with an integer value (``1e400`` raises OverflowError)."""
    if isinstance(value, bool):
        raise TypeError("the step must be an integer, not a boolean")
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"the step {value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"the step must be an integer, not {type(value).__name__}")
    return value


# --- output pumps -----------------------------------------------------------------------------------


def open_log(path: str) -> Optional[int]:
    """A descriptor appending to ``path``, or None (said once) when it cannot be opened: the run goes on."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        get_logger().warning("cannot open %s (%s): the command's output passes through but is not logged", path, exc.strerror)
        return None


class OutputPump(threading.Thread):
    """Copies one of the child's streams to ours as it arrives, to a log file, and to the metric parser.

    It cannot die while the stream is open: a failing log write (a full disk) is counted in
    :attr:`log_write_failures` and warned about once, a failing sink or line handler is ignored, and the
    stream is read to its end, so the command never blocks on a full pipe.
    """

    def __init__(
        self, source: IO[Any], sink: IO[bytes], log_fd: Optional[int], log_path: str,
        on_line: Callable[[bytes], Any], keep_tail: bool = False,
    ) -> None:
        super().__init__(name=f"anylearn-reporter-pump-{os.path.basename(log_path)}", daemon=True)
        self.source = source
        self.sink = sink
        self.log_fd = log_fd
        self.log_path = log_path
        self.on_line = on_line
        self.log_write_failures = 0 if log_fd is not None else 1
        self.tail: List[str] = [] if keep_tail else None  # type: ignore[assignment]
        self._partial = b""

    def run(self) -> None:
        fd = self.source.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self._pass_through(chunk)
                self._write_log(chunk)
                self._lines(chunk)
        finally:
            if self._partial:
                self._line(self._partial)
            if self.log_fd is not None:
                try:
                    os.close(self.log_fd)
                except OSError:
                    pass

    def _pass_through(self, chunk: bytes) -> None:
        try:
            self.sink.write(chunk)
            self.sink.flush()
        except Exception:  # noqa: BLE001 - our own stdout is gone: keep logging and parsing
            pass

    def _write_log(self, chunk: bytes) -> None:
        if self.log_fd is None:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.log_fd, view):]
        except OSError as exc:
            self.log_write_failures += 1
            if self.log_write_failures == 1:
                get_logger().warning(
                    "cannot write %s (%s): the output still passes through (said once; counted in summary.json)",
                    self.log_path, exc.strerror,
                )

    def _lines(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:  # output without newlines (a progress bar, binary) stays bounded
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        try:
            if self.tail is not None:
                self.tail.append(raw[:4096].decode("utf-8", "replace"))
                if len(self.tail) > STDERR_TAIL_LINES:
                    del self.tail[0]
            self.on_line(raw)
        except Exception as exc:  # noqa: BLE001 - the pump outlives any bookkeeping failure
            get_logger().debug("a line handler failed: %s", exc)


# --- outcome ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    state: int
    exit_code: int
    failure: Optional[str]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome_of(
    returncode: Optional[int], stop_signal: Optional[int], start_error: Optional[Exception] = None, program: str = ""
) -> Outcome:
    """The one failure ladder: (task state, wrapper exit code, failure reason) for every way a run ends.

    ``start_error`` is the error of a command that could not be started (127 when it was not found, 126
    otherwise); else ``returncode`` is the command's (negative: killed by that signal) and ``stop_signal`` the
    signal that told the wrapper to stop, if any. Problems found before launch never get here: they exit 2
    and report nothing.
    """
    if start_error is not None or returncode is None:
        code = 127 if isinstance(start_error, FileNotFoundError) else 126
        why = (getattr(start_error, "strerror", None) or str(start_error)) if start_error is not None else "no exit status"
        return Outcome(STATE_FAIL, code, f"cannot start {program!r}: {why}")
    exit_code = 128 - returncode if returncode < 0 else returncode
    if stop_signal is not None:
        return Outcome(STATE_ABORT, exit_code, f"stopped: the wrapper received {signal_name(stop_signal)}")
    if returncode == 0:
        return Outcome(STATE_SUCCESS, 0, None)
    if returncode < 0:
        return Outcome(STATE_FAIL, exit_code, f"the command was killed by {signal_name(-returncode)}")
    return Outcome(STATE_FAIL, exit_code, f"the command exited with code {returncode}")


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
            get_logger().info("the output directory %s exists and is not empty: keeping it (a resumed task)", path)
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the output directory {path}: {exc.strerror}; give --output another relative path") from None


# --- the supervisor ---------------------------------------------------------------------------------


class PeakRss(threading.Thread):
    """Samples the RSS of the child's process tree; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(name="anylearn-reporter-rss", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            try:
                total = root.memory_info().rss + sum(_rss(p) for p in root.children(recursive=True))
            except psutil.Error:
                break
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()


def _rss(process: Any) -> int:
    try:
        return process.memory_info().rss
    except Exception:
        return 0


class Supervisor:
    """Runs one child under the wrapper's care; :meth:`run` returns the wrapper's exit code.

    The order is the failure ladder's: everything that can fail without the command is done before it is
    launched (exit 2, nothing reported); once it runs, a failure of the wrapper's own bookkeeping is
    logged and the command stays supervised to its end.
    """

    def __init__(self, config: Config, options: RunOptions, env: Mapping[str, str]) -> None:
        self.config = config
        self.options = options
        self.env = env
        self.argv = build_argv(options)
        self.log = get_logger()
        self.run_dir = config.run_dir
        self.state_rank = options.node_rank * options.nproc_per_node  # only node 0's state records are sent
        self.writer = JournalWriter(self.run_dir, rank=self.state_rank)
        self.parser = MetricLineParser(
            options.metric_patterns, on_unreadable=lambda: self.writer.counters.count(COUNTER_UNREADABLE, "metric line"))
        self.stop_signal: Optional[int] = None
        self.child: Optional[subprocess.Popen] = None
        self._kill_deadline: Optional[float] = None
        self.deliverer: Any = None
        self.pumps: List[OutputPump] = []
        self.leftovers: Dict[str, int] = {"stopped": 0, "killed": 0}
        self.orphans_reaped = 0
        self._children_before: set = set()
        self._reap_warned = False
        self.tensorboard: Optional[EventFileTailer] = None

    # -- steps --

    def prepare(self) -> Dict[str, str]:
        """Everything before launch; ConfigError (exit 2, nothing reported) when something cannot be done."""
        child_env, _ = child_environment(self.env, self.config, self.options)
        check_launchable(self.argv, child_env)
        prepare_run_dir(self.run_dir)
        try:
            os.unlink(os.path.join(self.run_dir, SUMMARY_FILE))  # a resumed task: the old run's end is not this one's
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot replace {os.path.join(self.run_dir, SUMMARY_FILE)}: {exc.strerror}; remove it") from None
        prepare_output_dir(self.options.output_dir)
        if self.options.isolate_secret and not make_non_dumpable():
            raise ConfigError("--isolate-secret needs Linux (prctl PR_SET_DUMPABLE) to hide the key from the command; run without it")
        if not become_subreaper():
            self.log.debug("cannot become the subreaper of the command's tree: its orphans go to init")
        self._children_before = own_children()
        return child_env

    def start_delivery(self) -> None:
        if self.config.offline:
            # No lock taken: a sidecar sharing the run directory may deliver while the command runs.
            say_offline(self.run_dir)
            return
        from .deliver import build_deliverer

        self.deliverer = build_deliverer(self.config, run_dir=self.run_dir).start()
        self.deliverer.wait_for_lock(5)

    def _on_line(self, line: bytes) -> None:
        metric = self.parser.parse(line)
        if metric is not None:
            self.writer.append(metric.kind, metric.value, metric.name, metric.step)

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self._kill_deadline = time.monotonic() + self.options.grace_period_s
            self.log.info("received %s: passing it to the command; it is killed after %gs", signal_name(signum), self.options.grace_period_s)
        self._signal_child(signum)

    def _signal_child(self, signum: int) -> None:
        if self.child is not None and self.child.returncode is None:
            try:
                os.killpg(self.child.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def launch(self, child_env: Dict[str, str]) -> None:
        """Start the command; raises only when it could not be started. The logs are opened before."""
        logs = [os.path.join(self.run_dir, name) for name in (STDOUT_LOG, STDERR_LOG)]
        log_fds = [open_log(path) for path in logs]
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        try:
            child = self.child = subprocess.Popen(self.argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group)
        except BaseException:
            for fd in log_fds:
                if fd is not None:
                    os.close(fd)
            raise
        # From here on the command runs: nothing below may leave it unsupervised.
        if self.stop_signal is not None:  # told to stop while the command was being started
            self._signal_child(self.stop_signal)
        assert child.stdout is not None and child.stderr is not None
        sinks = (sys.stdout.buffer, sys.stderr.buffer)
        for path, fd, source, sink, tail in zip(logs, log_fds, (child.stdout, child.stderr), sinks, (False, True)):
            pump = OutputPump(source, sink, fd, path, self._on_line, keep_tail=tail)
            try:
                pump.start()
                self.pumps.append(pump)
            except Exception as exc:  # noqa: BLE001 - no thread: close the pipe so the command is not blocked on it
                self.log.error("cannot read the command's %s (%s): it is no longer passed through", os.path.basename(path), exc)
                source.close()
        try:
            atomic_write(os.path.join(self.run_dir, CHILD_PID_FILE), b"%d\n" % child.pid, fsync=False)  # for a sidecar
        except OSError as exc:
            self.log.warning("cannot write %s (%s): a sidecar cannot find the command", CHILD_PID_FILE, exc.strerror)

    def _reap(self) -> None:
        try:
            self.orphans_reaped += reap_orphans(self.child.pid if self.child is not None and self.child.returncode is None else None)
        except Exception as exc:  # noqa: BLE001
            if not self._reap_warned:
                self._reap_warned = True
                self.log.warning("cannot reap orphaned processes: %s", exc)

    def wait_child(self) -> int:
        assert self.child is not None
        while True:
            self._reap()
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
                    self.log.warning("the command did not stop within the %gs grace period: killing it", self.options.grace_period_s)
                    self._signal_child(signal.SIGKILL)
                    self._kill_deadline = None

    def stop_leftovers(self) -> None:
        """Stop what the command left in its process group, and its orphans, before the summary."""
        assert self.child is not None
        try:
            self.leftovers = stop_leftovers(self.child.pid, self.options.grace_period_s, self._children_before)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("cannot stop what the command left running: %s", exc)
            return
        self._reap()
        if self.leftovers["stopped"]:
            self.log.info(
                "stopped %d process(es) the command left running (%d needed SIGKILL after the %gs grace period)",
                self.leftovers["stopped"], self.leftovers["killed"], self.options.grace_period_s,
            )

    def drain(self) -> int:
        """Deliver what is pending for up to the drain timeout; returns how many records stay pending."""
        if self.deliverer is None:
            return count_pending(self.run_dir)
        total = count_pending(self.run_dir)
        progress = Progress(self.run_dir, total)
        try:
            self.deliverer.drain(self.options.drain_timeout_s, lambda pending, _: progress.update(total - pending))
        finally:
            progress.finish()
        return count_pending(self.run_dir)

    # -- the whole run --

    def run(self) -> int:
        started = time.time()
        child_env = self.prepare()
        self.start_delivery()
        if self.options.tensorboard_dir:  # TensorBoard event files -> journal, until the command ends
            self.tensorboard = EventFileTailer(self.options.tensorboard_dir, self.run_dir, self.writer,
                                               objective_tag=self.options.tensorboard_tag).start()  # its journal write wakes delivery
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in FORWARDED_SIGNALS}
        try:
            self.log.info("running %s", " ".join(shlex.quote(a) for a in self._redacted(self.argv)))
            self.writer.append(KIND_STATE, STATE_RUNNING, None, None)
            peak_rss = 0
            try:
                self.launch(child_env)
            except (OSError, ValueError, TypeError) as exc:  # ValueError/TypeError: what check_launchable did not foresee
                outcome = outcome_of(None, self.stop_signal, exc, self.argv[0])
                self.log.error("%s", outcome.failure)
            else:
                rss = PeakRss(self.child.pid)  # type: ignore[union-attr]
                try:
                    rss.start()
                except Exception:  # noqa: BLE001 - no sampler: no peak, the run goes on
                    pass
                outcome = outcome_of(self.wait_child(), self.stop_signal)
                rss.stop()
                peak_rss = rss.peak_bytes
                self.stop_leftovers()
                for pump in self.pumps:
                    pump.join(5)  # a process outside the group that keeps the pipe open must not hold the run
            if self.tensorboard is not None:
                self.tensorboard.stop()  # reads what the command flushed last, before the final state
            self.writer.append(KIND_STATE, outcome.state, None, None)
            pending = self.drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if pending:
            warn_pending(pending, self.run_dir)
        stderr_tail = next((pump.tail for pump in self.pumps if pump.tail is not None), [])
        try:
            self.write_summary(started, outcome, pending, peak_rss, stderr_tail)
        except OSError as exc:
            self.log.error("cannot write %s (%s)", os.path.join(self.run_dir, SUMMARY_FILE), exc.strerror)
        self.writer.close()
        return outcome.exit_code

    def _redacted(self, argv: List[str]) -> List[str]:
        key = self.config.secret_key.reveal() if self.config.secret_key else None
        return [a.replace(key, "***") if key else a for a in argv]

    def write_summary(self, started: float, outcome: Outcome, pending: int, peak_rss: int, stderr_tail: List[str]) -> None:
        ended = time.time()
        self.writer.counters.save()  # this process's losses, for read_run below
        run = read_run(self.run_dir, SendRule.of(self.config))  # the journal and the deliverer's status.json
        returncode = self.child.returncode if self.child is not None else None
        summary: Dict[str, Any] = {
            "task_id": self.config.task_id,
            "command": self._redacted(self.argv),
            "output_dir": self.options.output_dir,
            "started": started,
            "ended": ended,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ended)),
            "duration_s": round(ended - started, 3),
            "exit_code": outcome.exit_code,
            "signal": signal_name(-returncode) if returncode is not None and returncode < 0 else None,
            "stop_signal": signal_name(self.stop_signal) if self.stop_signal else None,
            "state": outcome.state,
            "state_name": STATE_NAMES[outcome.state],
            "offline": self.config.offline,
            "records": {
                "journalled": run.journalled,
                "delivered": run.delivered,
                "pending": pending,
                "rejected": run.rejected,
                "skipped": run.skipped,
                "unreadable_metric_lines": self.parser.unreadable,
                "invalid": run.invalid,
                "lost": run.lost,
            },
            "counters": run.counters,
            "last_intermediate_metric": run.last_metric,
            "final_metric": run.final_metric,
            "peak_rss_bytes": peak_rss,
            "output": {
                "unreadable_metric_lines": self.parser.unreadable,
                "log_write_failures": {os.path.basename(p.log_path): p.log_write_failures for p in self.pumps},
            },
            "process_tree": {
                "leftovers_stopped": self.leftovers["stopped"],
                "leftovers_killed": self.leftovers["killed"],
                "orphans_reaped": self.orphans_reaped,
            },
        }
        if outcome.failure:
            summary["failure"] = {"reason": outcome.failure, "stderr_tail": stderr_tail[-STDERR_TAIL_LINES:]}
        atomic_write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)


def dry_run(config: Config, options: RunOptions, env: Mapping[str, str]) -> int:
    """Print the final argv (a JSON array) and what the wrapper adds to the environment; launch nothing."""
    child_env, added = child_environment(env, config, options)
    check_launchable(build_argv(options), child_env)
    shown: Dict[str, Optional[str]] = dict(added)
    if options.isolate_secret:
        shown[ENV_SECRET_KEY] = None  # removed from the child's environment
    key = config.secret_key.reveal() if config.secret_key else None
    argv = [a.replace(key, "***") if key else a for a in build_argv(options)]
    print(json.dumps(argv))
    print(json.dumps(shown, indent=2))
    if options.tensorboard_dir:
        tag = f", objective tag {options.tensorboard_tag!r}" if options.tensorboard_tag else ", no objective tag: scalars are journalled, none sent"
        get_logger().info("would follow TensorBoard event files under %s%s", options.tensorboard_dir, tag)
    return 0


def run(args: Any, env: Optional[Mapping[str, str]] = None) -> int:
    """The ``run`` command: returns the exit code (the child's, 2 for bad usage)."""
    env = dict(os.environ if env is None else env)
    config = load_config_strict(env)  # ConfigError -> exit 2 in the CLI
    options = options_from(args, env)
    if options.dry_run:
        return dry_run(config, options, env)
    return Supervisor(config, options, env).run()
