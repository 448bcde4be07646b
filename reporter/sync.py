"""``anylearn-reporter sync RUN_DIR...``: deliver what a run left pending (an offline run, an outage, a
rejected key). Resumable: interrupted and run again, each record still reaches the backend once
(the cursor is saved at most every 50 ms and at stop; what was sent after it is resent with the same
``Idempotency-Key``)."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Tuple

from .checks import read_text_file
from .config import (
    EXIT_PENDING,
    STATUS_FILE,
    Config,
    ConfigError,
    Secret,
    backend_url_problem,
    load_config_strict,
    resolve_backend_url,
    secret_key_problem,
    task_id_problem,
    task_of_run_name,
)
from .log import Progress, counted, get_logger, stay_pending
from .runinfo import is_run_dir, recorded_task_id
from .runstatus import read_status


class Terminated(KeyboardInterrupt):
    """SIGTERM ended ``sync``: handled like Ctrl-C (the count of what stays pending is said), exit 143."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated()


def _task_of(run_dir: str, given: Optional[str]) -> str:
    problem = task_id_problem(given, "--task-id")
    if problem:
        raise ConfigError(problem)
    # The run's own files know its task; the directory's name is only a guess (ANYLEARN_REPORTER_RUN_DIR
    # may name it anything).
    recorded = recorded_task_id(run_dir)
    owner = recorded or task_of_run_name(os.path.basename(os.path.abspath(run_dir)))
    if given and owner and owner != given:
        where = "its own files say so" if recorded else "its name says so"
        raise ConfigError(f"{run_dir} holds task {owner}'s records ({where}), not {given}'s; "
                          "sync it without --task-id or with its own id")
    task_id = given or owner
    if not task_id:
        raise ConfigError(f"{run_dir} is an offline run: say which task it belongs to with --task-id or ANYLEARN_TASK_ID")
    return task_id


def _secret(secret_key_file: Optional[str], config: Config) -> Secret:
    if secret_key_file:
        key = read_text_file(secret_key_file, "--secret-key-file", secret=True).strip()
        if not key:
            raise ConfigError(f"--secret-key-file {secret_key_file} is empty")
        problem = secret_key_problem(key, f"--secret-key-file {secret_key_file}")
        if problem:
            raise ConfigError(problem)
        return Secret(key)
    if config.secret_key:
        return config.secret_key
    raise ConfigError("no secret key: set ANYLEARN_SECRET_KEY (or secret_key) or give --secret-key-file FILE")


def sync_one(run_dir: str, config: Config, timeout_s: Optional[float]) -> int:
    """Deliver one run directory; returns how many records stay pending."""
    from .deliver import build_deliverer
    from .cursor import count_pending
    from .runlock import lock_holder_pid

    log = get_logger()
    holder = lock_holder_pid(run_dir)
    if holder is not None:
        log.warning("%s is being delivered by process %d; leaving it to that process", run_dir, holder)
        return count_pending(run_dir)
    total = count_pending(run_dir)
    if total == 0:
        print(f"{run_dir}: nothing pending")
        return 0
    deliverer = build_deliverer(config, run_dir=run_dir, lock_poll_interval_s=0.05).start()
    if not deliverer.wait_for_lock(5):
        deliverer.close(0)
        log.warning("%s: another deliverer took the run first; leaving it to that process", run_dir)
        return count_pending(run_dir)
    progress = Progress(run_dir, total)
    try:
        deliverer.drain(timeout_s, lambda pending, drained: progress.update(total - pending, force=drained))
    except KeyboardInterrupt as exc:
        progress.finish()
        left = count_pending(run_dir)
        log.warning("%s: %s in %s; run the same command again to deliver the rest",
                    "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted", stay_pending(left), run_dir)
        raise
    progress.finish()
    pending = count_pending(run_dir)
    print(f"{run_dir}: {describe_sync(deliverer.delivered_now, deliverer.skipped_now, deliverer.rejected_now, pending)}"
          + (f" ({deliverer.paused_reason})" if deliverer.paused_reason else ""))
    return pending


def describe_sync(delivered: int, skipped: Dict[str, int], rejected: int, pending: int) -> str:
    """``3 delivered, 2 skipped (1 not the objective metric, 1 invalid record (...)), 0 rejected, 0 pending``."""
    parts = [f"{delivered} delivered"]
    if skipped:
        parts.append(counted(skipped, "skipped"))
    if rejected:
        parts.append(f"{rejected} rejected (kept in rejected.jsonl)")
    parts.append(f"{pending} pending")
    return ", ".join(parts)


def sync_command(run_dirs: List[str], *, task_id: Optional[str], backend_url: Optional[str],
                 secret_key_file: Optional[str], timeout_s: Optional[float], env: Optional[Mapping[str, str]] = None) -> int:
    """The ``sync`` command: 0 when every run is fully delivered, 3 when records stay pending; SIGTERM ends it
    like Ctrl-C (:class:`Terminated`). The backend URL: ``--backend-url``, else the environment's
    (``ANYLEARN_BACKEND_URL``, ``BACKEND_NAMESPACE``), else the one the run's ``status.json`` records, else
    AnyLearn's default."""
    env = os.environ if env is None else env
    base = load_config_strict(env)
    for run_dir in run_dirs:
        if not is_run_dir(run_dir):
            raise ConfigError(f"{run_dir} is not a run directory (it has no metrics.jsonl)")
    secret = _secret(secret_key_file, base)
    pending = 0
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        for run_dir in run_dirs:
            task = _task_of(run_dir, task_id or base.task_id)
            url, where = _backend_of(run_dir, backend_url, env)
            problem = backend_url_problem(url, where)
            if problem:
                raise ConfigError(problem)
            if where != "--backend-url":
                get_logger().info("%s: delivering to %s (from %s)", run_dir, url, where)
            config = replace(base, task_id=task, secret_key=secret, backend_url=url, run_dir=os.path.abspath(run_dir))
            pending += sync_one(config.run_dir, config, timeout_s)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_PENDING if pending else 0


def _backend_of(run_dir: str, given: Optional[str], env: Mapping[str, str]) -> Tuple[str, str]:
    """The URL to deliver ``run_dir`` to and where it came from (see :func:`sync_command`)."""
    if given:
        return given.rstrip("/"), "--backend-url"
    url, source = resolve_backend_url(env, False)  # only what the environment names
    if url:
        return url, source
    status, _ = read_status(run_dir)
    if status is not None and status.backend_url:
        return status.backend_url.rstrip("/"), f"{STATUS_FILE} of the run"
    url, source = resolve_backend_url(env, True)
    return (url or "").rstrip("/"), source
