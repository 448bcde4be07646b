"""One run from the run directory to ``summary.json``: the order of the steps, and what the run reports.

Validate everything first (exit 2, nothing launched, nothing reported), prepare the run and output
directories, take the run's deliver lock and deliver its journal while the command runs, journal state 1,
supervise the command (:mod:`.supervise`) while its output is read for metrics (:mod:`.output`) and, for a
local task (a user's token), shipped with a heartbeat (:mod:`..logship`), journal its final state, drain,
and write ``summary.json``. Once the command ended, a stop signal (SIGINT, SIGTERM, SIGHUP) stops the
waiting at once: the final state and ``summary.json`` are written, what is pending stays for ``sync``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import time
from typing import Any, Dict, Mapping, Optional

from ..advice import offline_reason
from ..config import (
    ENV_OBJECTIVE_MODE,
    ENV_SECRET_KEY,
    PARAMS_FILE,
    STATE_NAMES,
    STATE_RUNNING,
    SUMMARY_FILE,
    Config,
    ConfigError,
    load_config_strict,
)
from ..checks import MAX_DURATION_S
from ..cursor import count_pending
from ..journal import JournalWriter
from ..ledger import COUNTER_LOG_WRITE_FAILED, COUNTER_UNREADABLE
from ..log import Progress, get_logger, records, say_offline, warn_pending
from ..osutil import atomic_write_json
from ..policy import SendRule
from ..record import KIND_STATE
from ..runinfo import read_run
from ..runmeta import HOST_RUN, attempt_summary_file, mark_attempt, write_objective
from ..tbevents import EventFileTailer
from .launch import (
    RunOptions,
    build_argv,
    check_launchable,
    child_environment,
    options_from,
    prepare_output_dir,
    prepare_run_dir,
    redacted,
)
from .output import STDERR_TAIL_LINES, MetricLineParser
from ..paramsfile import write_params_file
from .reaper import become_subreaper, make_non_dumpable
from .supervise import FORWARDED_SIGNALS, Child, RunEnding, signal_name, signals_passed_to

OUTPUT_BEFORE_STATE_S = 5.0  # the most the final state waits for a local task's output to be shipped
QUIET_DRAIN_S = 1.0  # a drain that delivers everything this fast is not announced


class Run:
    """One run of the command; :meth:`run` returns the wrapper's exit code.

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
        counters = self.writer.counters  # the run's host counters: status.json and summary.json show them
        self.parser = MetricLineParser(options.metric_patterns, on_unreadable=lambda: counters.record_lost("metric line", category=COUNTER_UNREADABLE))
        self.child = Child(self.argv, self.run_dir, options.grace_period_s, self._on_line,
                           on_log_failure=lambda name: counters.record_lost(name, category=COUNTER_LOG_WRITE_FAILED))
        self.deliverer: Any = None
        self.agent: Any = None  # a local task's heartbeat and log shipping (reporter/logship.py)
        self.drain_deadline: Optional[float] = None
        self.drain_interrupted = False  # a stop signal after the command's end stopped the waiting
        self._in_journal_drain = False  # a stop signal then raises KeyboardInterrupt to end the drain's wait
        self.tensorboard: Optional[EventFileTailer] = None
        self.attempt: Optional[int] = None

    # -- steps --

    def prepare(self) -> Dict[str, str]:
        """Everything before launch; ConfigError (exit 2, nothing reported) when something cannot be done.
        Returns the command's environment."""
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
        self.attempt = mark_attempt(self.run_dir, HOST_RUN)  # a resumed task: its records start here
        self.write_params()
        if self.config.objective_mode:
            write_objective(self.run_dir, self.config.objective_metric, self.config.objective_mode, ENV_OBJECTIVE_MODE, replace=False)
        if self.options.isolate_secret and not make_non_dumpable():
            raise ConfigError("--isolate-secret needs Linux (prctl PR_SET_DUMPABLE) to hide the key from the command; run without it")
        if not become_subreaper():
            self.log.debug("cannot become the subreaper of the command's tree: its orphans go to init")
        return child_env

    def write_params(self) -> None:
        """The command's hyper-parameters as ``params.json`` (for ``ui``), the key and the token masked in
        every form; a failure is logged, the run goes on."""
        if not self.options.params:
            return
        problem = write_params_file(self.run_dir, self.options.params, self.config.secret_key, self.config.auth_token)
        if problem:
            self.log.warning("cannot write %s: %s", PARAMS_FILE, problem)

    def start_delivery(self) -> None:
        if self.config.offline:
            # No lock taken: a sidecar sharing the run directory may deliver while the command runs.
            say_offline(self.run_dir, offline_reason(self.env))
            return
        from ..deliver import build_deliverer

        self.deliverer = build_deliverer(self.config, run_dir=self.run_dir).start()
        self.deliverer.wait_for_lock(5)

    def _on_line(self, line: bytes) -> None:
        metric = self.parser.parse(line)
        if metric is not None:
            self.writer.append(metric.kind, metric.value, metric.name, metric.step)  # the write wakes delivery

    def drain(self) -> int:
        """Deliver what is pending until the drain deadline (the drain timeout from the command's end, else
        from now), a local task's output meanwhile; returns how many records stay pending."""
        deadline = self.drain_deadline or time.monotonic() + self.options.drain_timeout_s
        try:
            return self._drain_journal(deadline)
        finally:
            if self.agent is not None:  # after a stop signal: no more waiting for the output either
                self.agent.close(0 if self.drain_interrupted else deadline - time.monotonic())

    def _stop_waiting(self, signum: int, _frame: Any) -> None:
        """A stop signal after the command ended: stop waiting for delivery and for the output's shipping."""
        if not self.drain_interrupted:
            self.drain_interrupted = True
            self.log.warning("interrupted (%s): stopped waiting for delivery", signal_name(signum))
        if self.agent is not None:
            self.agent.abandon()
        if self._in_journal_drain:
            self._in_journal_drain = False
            raise KeyboardInterrupt

    def _wait_for_output(self) -> None:
        """The rest of a local task's output and its end line go before the final state, so a reader that
        sees the task finished (the SDK's ``stream_log``) has the whole log: waited for while it flows, up to
        half the drain timeout and :data:`OUTPUT_BEFORE_STATE_S`; not while the backend is down, not after
        a stop signal (the final state is never held by the backend)."""
        limit = time.monotonic() + min(self.options.drain_timeout_s / 2, OUTPUT_BEFORE_STATE_S)
        while not self.drain_interrupted and not self.agent.failing:
            left = limit - time.monotonic()
            if left <= 0 or self.agent.wait(min(left, 0.1)):
                return

    def _drain_journal(self, deadline: float) -> int:
        if self.deliverer is None:
            return count_pending(self.run_dir)
        total = count_pending(self.run_dir)
        progress = Progress(self.run_dir, total)
        try:
            if self.drain_interrupted:  # a stop signal came before the drain began
                raise KeyboardInterrupt
            self._in_journal_drain = True
            remaining = max(deadline - time.monotonic(), 0.0)
            # Said only when the drain has to wait: a healthy backend takes the last records in milliseconds.
            if total and not self.deliverer.flush(min(remaining, QUIET_DRAIN_S)) and not self.deliverer.paused_reason:
                left = count_pending(self.run_dir)
                remaining = max(deadline - time.monotonic(), 0.0)
                if self.options.drain_timeout_s >= MAX_DURATION_S:  # --drain-timeout inf
                    how_long = "without a time limit"
                else:
                    how_long = "up to %gs" % (math.ceil(remaining) if remaining >= 1 else math.ceil(remaining * 10) / 10)
                if remaining > 0:  # else the quiet second took the whole drain: nothing is left to wait for
                    self.log.info(
                        "the command has ended; waiting %s (--drain-timeout, ANYLEARN_DRAIN_TIMEOUT) to deliver %s "
                        "to %s; Ctrl-C stops waiting and leaves %s for `anylearn-reporter sync`",
                        how_long, records(left), self.config.backend_url, "it" if left == 1 else "them",
                    )
            self.deliverer.drain(remaining, lambda pending, _: progress.update(total - pending))
            self._in_journal_drain = False
        except KeyboardInterrupt:
            self._in_journal_drain = False
            progress.finish()
            self.deliverer.close(0)  # when the interrupt came before the drain began
        else:
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
        if not self.config.offline and self.config.auth_token:
            from ..logship import local_agent

            self.agent = local_agent(self.config, self.run_dir)
        with signals_passed_to(self.child):
            self.log.info("running %s", " ".join(shlex.quote(a) for a in redacted(self.argv, self.config.secret_key, self.config.auth_token)))
            self.writer.append(KIND_STATE, STATE_RUNNING, None, None)
            outcome = self.child.supervise(child_env)
            if self.tensorboard is not None:
                self.tensorboard.stop()  # reads what the command flushed last, before the final state
            self.drain_deadline = time.monotonic() + self.options.drain_timeout_s
            # From here a stop signal has no command to go to: it stops the waiting (the previous handlers,
            # the child's, come back after the block).
            previous = {sig: signal.signal(sig, self._stop_waiting) for sig in FORWARDED_SIGNALS}
            try:
                if self.agent is not None:
                    self.agent.finish(outcome.exit_code)
                    self._wait_for_output()
                self.writer.append(KIND_STATE, outcome.state, None, None)
                pending = self.drain()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if pending:
            refused = self.deliverer is not None and (self.deliverer.paused_reason or "").startswith("auth")
            warn_pending(pending, self.run_dir, self.config.backend_url, new_key=refused)
        try:
            self.write_summary(started, outcome, pending)
        except OSError as exc:
            self.log.error("cannot write %s (%s)", os.path.join(self.run_dir, SUMMARY_FILE), exc.strerror)
        self.writer.close()
        return outcome.exit_code

    def write_summary(self, started: float, outcome: RunEnding, pending: int) -> None:
        ended = time.time()
        self.writer.counters.save()  # this process's counters, for read_run below
        run = read_run(self.run_dir, SendRule.of(self.config))  # the journal and the deliverer's status.json
        current = run.attempts[-1] if run.attempts else run  # this attempt's metrics, not earlier ones'
        child = self.child
        returncode = child.returncode
        summary: Dict[str, Any] = {
            "task_id": self.config.task_id,
            "command": redacted(self.argv, self.config.secret_key, self.config.auth_token),
            "output_dir": self.options.output_dir,
            "started": started,
            "ended": ended,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ended)),
            "duration_s": round(ended - started, 3),
            "exit_code": outcome.exit_code,
            "signal": signal_name(-returncode) if returncode is not None and returncode < 0 else None,
            "stop_signal": signal_name(child.stop_signal) if child.stop_signal else None,
            "state": outcome.state,
            "state_name": STATE_NAMES[outcome.state],
            "attempt": self.attempt,
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
            "last_intermediate_metric": current.last_metric,
            "final_metric": current.final_metric,
            "peak_rss_bytes": child.peak_rss_bytes,
            "output": {
                "unreadable_metric_lines": self.parser.unreadable,
                "log_write_failures": child.log_write_failures,
            },
            "process_tree": {
                "leftovers_stopped": child.leftovers["stopped"],
                "leftovers_killed": child.leftovers["killed"],
                "orphans_reaped": child.orphans_reaped,
            },
        }
        if outcome.failure:
            summary["failure"] = {"reason": outcome.failure, "stderr_tail": child.stderr_tail[-STDERR_TAIL_LINES:]}
        if self.attempt is not None:  # summary.json is overwritten by the next attempt; this copy stays
            atomic_write_json(os.path.join(self.run_dir, attempt_summary_file(self.attempt)), summary)
        atomic_write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)


def dry_run(config: Config, options: RunOptions, env: Mapping[str, str]) -> int:
    """Print the final argv (a JSON array) and what the wrapper adds to the environment; launch nothing."""
    argv = build_argv(options)
    child_env, added = child_environment(env, config, options)
    check_launchable(argv, child_env)
    shown: Dict[str, Optional[str]] = dict(added)
    if options.isolate_secret:
        shown[ENV_SECRET_KEY] = None  # removed from the child's environment
    print(json.dumps(redacted(argv, config.secret_key, config.auth_token)))
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
    return Run(config, options, env).run()
