"""``anylearn-reporter run``: build, launch and supervise a training command, and report for it.

One run: validate everything first (exit 2, nothing launched), prepare the output directory, take the
run's deliver lock and deliver its journal while the child runs, launch the child (argv only, its own
process group), pass its output through while logging it and reading metric lines, forward signals,
report the task state, drain, and write ``summary.json``.
"""

from __future__ import annotations

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
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple

from .config import (
    CHILD_PID_FILE,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_OUTPUT_DIR,
    ENV_ARTIFACT_IDS,
    ENV_DRAIN_TIMEOUT,
    ENV_ENTRYPOINT,
    ENV_GRACE_PERIOD,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRIC_PATTERNS,
    ENV_NODE_RANK,
    ENV_NODE_RANK_GENERIC,
    ENV_NPROC_PER_NODE,
    ENV_NUM_NODES,
    ENV_OUTPUT,
    ENV_RUN_DIR,
    ENV_SECRET_KEY,
    ENV_SECRET_KEY_PLATFORM,
    ENV_SUPERVISOR_PID,
    ENV_TASK_OUTPUT_PATH,
    ENV_TRAIN_PARAMS,
    ENV_TRAIN_PARAMS_DELIMITER,
    ENV_TRAIN_PARAMS_DELIMITER_ANYLEARN,
    ENV_TRAIN_PARAMS_PREFIX,
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
    KIND_FINAL,
    KIND_INTERMEDIATE,
    KIND_STATE,
    JournalWriter,
    atomic_write,
    atomic_write_json,
    count_pending,
)
from .log import Progress, get_logger, say_offline, warn_pending
from .params import artifact_paths, parse_params, render_params
from .runinfo import read_run

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STDERR_TAIL_LINES = 50
MAX_LINE_BYTES = 1 << 20
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
    and user patterns with a named group ``value`` (``name``, ``step`` optional)."""

    def __init__(self, patterns: List["re.Pattern[str]"]) -> None:
        self.patterns = patterns
        self._warned = False

    def parse(self, line: str) -> Optional[ParsedMetric]:
        text = line.rstrip("\r\n")
        stripped = text.strip()
        try:
            if stripped.startswith(FINAL_METRIC_PREFIX):
                return self._from_payload(KIND_FINAL, stripped[len(FINAL_METRIC_PREFIX):])
            if stripped.startswith(METRIC_PREFIX):
                return self._from_payload(KIND_INTERMEDIATE, stripped[len(METRIC_PREFIX):])
            for pattern in self.patterns:
                match = pattern.search(text)
                if match:
                    groups = match.groupdict()
                    step = groups.get("step")
                    return ParsedMetric(KIND_INTERMEDIATE, float(groups["value"]), groups.get("name"), int(step) if step else None)
        except (ValueError, TypeError, KeyError) as exc:
            if not self._warned:
                self._warned = True
                get_logger().warning("ignoring a metric line that could not be read (%s): %.120s (said once)", exc, text)
        return None

    @staticmethod
    def _from_payload(kind: str, payload: str) -> ParsedMetric:
        payload = payload.strip()
        if payload.startswith("{"):
            data = json.loads(payload)
            step = data.get("step")
            name = data.get("name")
            value = data["value"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"value must be a number, not {type(value).__name__}")
            return ParsedMetric(kind, float(value), None if name is None else str(name), None if step is None else int(step))
        return ParsedMetric(kind, float(payload))


# --- output pumps -----------------------------------------------------------------------------------


class OutputPump(threading.Thread):
    """Copies one of the child's streams to ours as it arrives, to a log file, and to the metric parser."""

    def __init__(self, source: IO[Any], sink: IO[bytes], log_path: str, on_line: Any, keep_tail: bool = False) -> None:
        super().__init__(name=f"anylearn-reporter-pump-{os.path.basename(log_path)}", daemon=True)
        self.source = source
        self.sink = sink
        self.log = open(log_path, "ab")
        self.on_line = on_line
        self.tail: List[str] = [] if keep_tail else None  # type: ignore[assignment]
        self._partial = b""

    def run(self) -> None:
        fd = self.source.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                try:
                    self.sink.write(chunk)
                    self.sink.flush()
                except (OSError, ValueError):
                    pass  # our own stdout is gone; keep logging and parsing
                self.log.write(chunk)
                self.log.flush()
                self._lines(chunk)
        finally:
            if self._partial:
                self._line(self._partial)
            self.log.close()

    def _lines(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:  # output without newlines (a progress bar, binary) stays bounded
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        if self.tail is not None:
            self.tail.append(line)
            if len(self.tail) > STDERR_TAIL_LINES:
                del self.tail[0]
        self.on_line(line)


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


def outcome_of(returncode: int, stop_signal: Optional[int]) -> Outcome:
    """The one failure ladder: (task state, wrapper exit code, failure reason) for how the child ended."""
    exit_code = 128 - returncode if returncode < 0 else returncode
    if stop_signal is not None:
        return Outcome(STATE_ABORT, exit_code, f"stopped: the wrapper received {signal_name(stop_signal)}")
    if returncode == 0:
        return Outcome(STATE_SUCCESS, 0, None)
    if returncode < 0:
        return Outcome(STATE_FAIL, exit_code, f"the command was killed by {signal_name(-returncode)}")
    return Outcome(STATE_FAIL, exit_code, f"the command exited with code {returncode}")


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
    """Runs one child under the wrapper's care; :meth:`run` returns the wrapper's exit code."""

    def __init__(self, config: Config, options: RunOptions, env: Mapping[str, str]) -> None:
        self.config = config
        self.options = options
        self.env = env
        self.argv = build_argv(options)
        self.log = get_logger()
        self.run_dir = config.run_dir
        self.state_rank = options.node_rank * options.nproc_per_node  # only node 0's state records are sent
        self.writer = JournalWriter(self.run_dir, rank=self.state_rank)
        self.parser = MetricLineParser(options.metric_patterns)
        self.stop_signal: Optional[int] = None
        self.child: Optional[subprocess.Popen] = None
        self._kill_deadline: Optional[float] = None
        self.deliverer: Any = None

    # -- steps --

    def prepare_output(self) -> None:
        path = self.options.output_dir
        if os.path.isdir(path) and os.listdir(path):
            self.log.info("the output directory %s exists and is not empty: keeping it (a resumed task)", path)
        os.makedirs(path, exist_ok=True)

    def start_delivery(self) -> None:
        if self.config.offline:
            # No lock taken: a sidecar sharing the run directory may deliver while the command runs.
            say_offline(self.run_dir)
            return
        from .deliver import build_deliverer

        self.deliverer = build_deliverer(self.config, run_dir=self.run_dir).start()
        self.deliverer.first_lock_attempt.wait(5)

    def _on_line(self, line: str) -> None:
        metric = self.parser.parse(line)
        if metric is not None:
            self.writer.append(metric.kind, metric.value, metric.name, metric.step)
            if self.deliverer is not None:
                self.deliverer.wake()

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
            except ProcessLookupError:
                pass

    def launch(self, child_env: Dict[str, str]) -> Tuple[OutputPump, OutputPump]:
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        child = self.child = subprocess.Popen(self.argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group)
        if self.stop_signal is not None:  # told to stop while the command was being started
            self._signal_child(self.stop_signal)
        atomic_write(os.path.join(self.run_dir, CHILD_PID_FILE), b"%d\n" % child.pid, fsync=False)  # for a sidecar
        assert child.stdout is not None and child.stderr is not None
        out = OutputPump(child.stdout, sys.stdout.buffer, os.path.join(self.run_dir, STDOUT_LOG), self._on_line)
        err = OutputPump(child.stderr, sys.stderr.buffer, os.path.join(self.run_dir, STDERR_LOG), self._on_line, keep_tail=True)
        out.start()
        err.start()
        return out, err

    def _child_pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def wait_child(self) -> int:
        assert self.child is not None
        while True:
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
                    self.log.warning("the command did not stop within the %gs grace period: killing it", self.options.grace_period_s)
                    self._signal_child(signal.SIGKILL)
                    self._kill_deadline = None

    def drain(self) -> int:
        """Deliver what is pending for up to the drain timeout; returns how many records stay pending."""
        if self.deliverer is None:
            return count_pending(self.run_dir)
        total = self.deliverer.pending()
        progress = Progress(self.run_dir, total)
        try:
            self.deliverer.drain(self.options.drain_timeout_s, lambda pending, _: progress.update(total - pending))
        finally:
            progress.finish()
        return count_pending(self.run_dir)

    # -- the whole run --

    def run(self) -> int:
        started = time.time()
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            os.unlink(os.path.join(self.run_dir, SUMMARY_FILE))  # a resumed task: the old run's end is not this one's
        except FileNotFoundError:
            pass
        self.prepare_output()
        child_env, _ = child_environment(self.env, self.config, self.options)
        self.start_delivery()
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in FORWARDED_SIGNALS}
        self.log.info("running %s", " ".join(shlex.quote(a) for a in self._redacted(self.argv)))
        self.writer.append(KIND_STATE, STATE_RUNNING, None, None)
        pumps: List[OutputPump] = []
        peak_rss = 0
        try:
            pumps = list(self.launch(child_env))
        except OSError as exc:
            returncode = 127 if isinstance(exc, FileNotFoundError) else 126
            outcome = Outcome(STATE_FAIL, returncode, f"cannot start {self.argv[0]!r}: {exc.strerror}")
            self.log.error("%s", outcome.failure)
        else:
            rss = PeakRss(self._child_pid())
            rss.start()
            outcome = outcome_of(self.wait_child(), self.stop_signal)
            rss.stop()
            peak_rss = rss.peak_bytes
            for pump in pumps:
                pump.join(5)  # a grandchild that keeps the pipe open must not hold the run
        self.writer.append(KIND_STATE, outcome.state, None, None)
        pending = self.drain()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            warn_pending(pending, self.run_dir)
        self.write_summary(started, outcome, pending, peak_rss, pumps[1].tail if pumps else [])
        self.writer.close()
        return outcome.exit_code

    def _redacted(self, argv: List[str]) -> List[str]:
        key = self.config.secret_key.reveal() if self.config.secret_key else None
        return [a.replace(key, "***") if key else a for a in argv]

    def write_summary(self, started: float, outcome: Outcome, pending: int, peak_rss: int, stderr_tail: List[str]) -> None:
        ended = time.time()
        run = read_run(self.run_dir, self.config.objective_metric)  # the journal and the deliverer's status.json
        returncode = self.child.returncode if self.child is not None else None
        summary = {
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
            },
            "last_intermediate_metric": run.last_metric,
            "final_metric": run.final_metric,
            "peak_rss_bytes": peak_rss,
        }
        if outcome.failure:
            summary["failure"] = {"reason": outcome.failure, "stderr_tail": stderr_tail[-STDERR_TAIL_LINES:]}
        atomic_write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)


def dry_run(config: Config, options: RunOptions, env: Mapping[str, str]) -> int:
    """Print the final argv (a JSON array) and what the wrapper adds to the environment; launch nothing."""
    _, added = child_environment(env, config, options)
    shown: Dict[str, Optional[str]] = dict(added)
    if options.isolate_secret:
        shown[ENV_SECRET_KEY] = None  # removed from the child's environment
    key = config.secret_key.reveal() if config.secret_key else None
    argv = [a.replace(key, "***") if key else a for a in build_argv(options)]
    print(json.dumps(argv))
    print(json.dumps(shown, indent=2))
    return 0


def run(args: Any, env: Optional[Mapping[str, str]] = None) -> int:
    """The ``run`` command: returns the exit code (the child's, 2 for bad usage)."""
    env = dict(os.environ if env is None else env)
    config = load_config_strict(env)  # ConfigError -> exit 2 in the CLI
    options = options_from(args, env)
    if options.dry_run:
        return dry_run(config, options, env)
    return Supervisor(config, options, env).run()
