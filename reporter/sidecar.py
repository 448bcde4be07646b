"""``anylearn-reporter sidecar``: deliver a run's journal from next to the training container.

It takes the run's deliver lock (waiting while an in-process thread holds it, then taking over), follows
the journal with the core deliverer, samples resources into ``resources.jsonl`` and heartbeats. It ends
when the run ends (``summary.json`` appears, the watched pid is gone, or SIGTERM), drains, and exits 0
when everything was delivered, 3 when records stay pending.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .checks import option_or_env, parse_duration
from .config import (
    CHILD_PID_FILE,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_RESOURCE_INTERVAL_S,
    ENV_DRAIN_TIMEOUT,
    ENV_OUTPUT,
    ENV_RESOURCE_INTERVAL,
    ENV_TENSORBOARD_DIR,
    ENV_TENSORBOARD_TAG,
    EXIT_PENDING,
    HEARTBEAT_FILE,
    SUMMARY_FILE,
    Config,
    ConfigError,
    load_config_strict,
)
from .log import get_logger, warn_pending

END_CHECK_INTERVAL_S = 0.5


@dataclass
class SidecarOptions:
    resource_interval_s: float = DEFAULT_RESOURCE_INTERVAL_S
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    pid: Optional[int] = None
    tensorboard_dir: Optional[str] = None  # TensorBoard event files to journal (reporter/tbevents.py)
    tensorboard_tag: Optional[str] = None


def options_from(args: Any, env: Any) -> SidecarOptions:
    options = SidecarOptions(
        resource_interval_s=parse_duration(option_or_env(args.interval, env, ENV_RESOURCE_INTERVAL), f"--interval ({ENV_RESOURCE_INTERVAL})",
                                           DEFAULT_RESOURCE_INTERVAL_S, positive=True),
        heartbeat_interval_s=parse_duration(args.heartbeat, "--heartbeat", DEFAULT_HEARTBEAT_INTERVAL_S, positive=True),
        drain_timeout_s=parse_duration(option_or_env(args.drain_timeout, env, ENV_DRAIN_TIMEOUT), f"--drain-timeout ({ENV_DRAIN_TIMEOUT})",
                                       DEFAULT_DRAIN_TIMEOUT_S),
        pid=args.pid,
    )
    from .tbevents import tensorboard_directory

    output_dir = os.path.abspath(option_or_env(None, env, ENV_OUTPUT) or DEFAULT_OUTPUT_DIR)
    options.tensorboard_dir = tensorboard_directory(option_or_env(getattr(args, "tensorboard_dir", None), env, ENV_TENSORBOARD_DIR), output_dir)
    options.tensorboard_tag = option_or_env(getattr(args, "tensorboard_tag", None), env, ENV_TENSORBOARD_TAG)
    if options.pid is not None and not _pid_alive(options.pid):
        raise ConfigError(f"--pid {options.pid}: no such process (is the process namespace shared with the training container?)")
    return options


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Heartbeat:
    """Sends ``/train_task/heartbeat`` every interval (POST with the key; PATCH in the SDK agent's shape with
    a user's token); a backend without it (404/405) turns it off, said once and, with ``run_dir``, written to
    ``heartbeat.json`` for ``status``."""

    def __init__(self, config: Config, run_dir: Optional[str] = None) -> None:
        from .client import BackendClient

        self.client = BackendClient.from_config(config, with_token=True)
        self.enabled = True
        self._failing = False
        self._run_dir = run_dir
        self._said: Optional[str] = None  # the state last written to heartbeat.json

    def _record(self, state: str, reason: str = "") -> None:
        if self._run_dir is None or self._said == state:
            return
        from .journal import atomic_write_json

        try:
            atomic_write_json(os.path.join(self._run_dir, HEARTBEAT_FILE), {"heartbeats": state, "reason": reason, "ts": time.time()})
            self._said = state
        except OSError as exc:
            get_logger().debug("cannot write %s: %s", HEARTBEAT_FILE, exc.strerror)

    def beat(self) -> None:
        from .client import Outcome, TransientError

        if not self.enabled:
            return
        log = get_logger()
        try:
            result = self.client.heartbeat(timeout_s=10)
        except TransientError as exc:
            if not self._failing:
                log.warning("heartbeat failed (%s); will try again", exc.reason)
            self._failing = True
            return
        self._failing = False
        if result.outcome is Outcome.DELIVERED:
            self._record("on")
        elif result.outcome is Outcome.UNSUPPORTED:
            self.enabled = False
            log.warning("the backend has no heartbeat endpoint (HTTP %d); heartbeats are off", result.status)
            self._record("off", f"the backend has no heartbeat endpoint (HTTP {result.status})")
        elif result.outcome is Outcome.REDIRECT:
            self.enabled = False  # never followed: the key would go along
            log.warning("heartbeat answered HTTP %d (%s): redirects are never followed; heartbeats are off",
                        result.status, result.reason)
            self._record("off", f"HTTP {result.status}: redirects are never followed")
        elif result.outcome is Outcome.SETUP:
            self.enabled = False
            log.warning("heartbeats are off: %s", result.reason)
            self._record("off", result.reason)
        elif result.outcome is not Outcome.DELIVERED:
            log.warning("heartbeat refused (HTTP %d: %s)", result.status, result.reason)

    def close(self) -> None:
        self.client.close()


class Sidecar:
    """One sidecar run; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, options: SidecarOptions) -> None:
        self.config = config
        self.options = options
        self.run_dir = config.run_dir
        self.log = get_logger()
        self.stop_event = threading.Event()
        self.end_reason: Optional[str] = None
        self._watched_pid: Optional[int] = options.pid
        self._child_pid_seen: Optional[int] = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.end_reason = f"received {signal.Signals(signum).name}"
        self.stop_event.set()

    def watched_pid(self) -> Optional[int]:
        """The ``--pid``, else the child pid the wrapper recorded (when this namespace can see it)."""
        if self.options.pid is not None:
            return self.options.pid
        try:
            with open(os.path.join(self.run_dir, CHILD_PID_FILE)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return self._watched_pid
        if pid != self._child_pid_seen:
            self._child_pid_seen = pid
            self._watched_pid = pid if _pid_alive(pid) else None
        return self._watched_pid

    def run_ended(self) -> Optional[str]:
        if os.path.exists(os.path.join(self.run_dir, SUMMARY_FILE)):
            return "the run ended (summary.json appeared)"
        pid = self.watched_pid()
        if pid is not None and not _pid_alive(pid):
            return f"the watched process {pid} is gone"
        return None

    def run(self) -> int:
        from .deliver import build_deliverer
        from .journal import count_pending
        from .resources import ResourceSampler

        os.makedirs(self.run_dir, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        deliverer = build_deliverer(self.config, run_dir=self.run_dir).start()
        sampler = ResourceSampler(self.run_dir)
        heartbeat = Heartbeat(self.config, self.run_dir)
        tensorboard = None
        if self.options.tensorboard_dir:  # TensorBoard event files -> journal, until the run ends
            from .journal import JournalWriter
            from .tbevents import EventFileTailer

            tensorboard = EventFileTailer(self.options.tensorboard_dir, self.run_dir, JournalWriter(self.run_dir, rank=self.config.rank),
                                          objective_tag=self.options.tensorboard_tag).start()  # its journal write wakes delivery
        self.log.info("sidecar for task %s: delivering %s to %s", self.config.task_id, self.run_dir, self.config.backend_url)
        next_sample = time.monotonic()
        next_beat = time.monotonic()
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= next_sample:
                    sampler.sample(self.watched_pid())
                    next_sample = now + self.options.resource_interval_s
                if now >= next_beat:
                    heartbeat.beat()
                    next_beat = now + self.options.heartbeat_interval_s
                reason = self.run_ended()
                if reason:
                    self.end_reason = reason
                    break
                wait_s = min(next_sample, next_beat, now + END_CHECK_INTERVAL_S) - time.monotonic()
                self.stop_event.wait(max(wait_s, 0.0))
            self.log.info("%s: draining for up to %gs", self.end_reason, self.options.drain_timeout_s)
            sampler.sample(self.watched_pid())
            if tensorboard is not None:
                tensorboard.stop()
            drained = deliverer.close(self.options.drain_timeout_s)
        finally:
            heartbeat.close()
        pending = 0 if drained else count_pending(self.run_dir)
        if pending:
            warn_pending(pending, self.run_dir, self.config.backend_url)
            return EXIT_PENDING
        return 0


def run(args: Any, env: Optional[Any] = None) -> int:
    """The ``sidecar`` command."""
    env = os.environ if env is None else env
    config = load_config_strict(env)
    if config.offline:
        raise ConfigError(
            "the sidecar needs a task to deliver to: set ANYLEARN_TASK_ID (or task_id), ANYLEARN_SECRET_KEY "
            "(or secret_key) and ANYLEARN_BACKEND_URL (or BACKEND_NAMESPACE)"
        )
    return Sidecar(config, options_from(args, env)).run()
