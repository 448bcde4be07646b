"""``anylearn-reporter``: the command line. A shim: it parses arguments and hands each command to its module.

Exit codes: 0 success, 1 a check failed (``status``, ``doctor``), 2 bad usage or configuration, 3 records
stay pending (``sidecar``, ``sync``); ``run`` exits with its child's code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, List, Optional

from .config import (DEFAULT_UI_PORT, ENV_ANYBOARD_PASSWORD, ENV_ANYBOARD_USER, ENV_AUTH_TOKEN,
                     ENV_REPORTER_DIR, ENV_RUN_DIR, ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM, ENV_TOKEN, JOURNAL_FILE,
                     ConfigError, check_backend_url, check_secret_key, check_task_id, load_config,
                     load_config_strict)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_JOURNALLED = 1  # `report`: the record could not be written to the journal


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--secret-key` must never be taken for `--secret-key-file`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"anylearn-reporter: error: {message}\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _task_arg(text: str) -> tuple:
    task_id, sep, key = text.partition(":")
    if not task_id:
        raise argparse.ArgumentTypeError("give a task as ID:KEY, or as ID with the key in ANYLEARN_SECRET_KEY")
    if not sep:
        key = os.environ.get(ENV_SECRET_KEY) or os.environ.get(ENV_SECRET_KEY_PLATFORM) or ""
        if not key:
            raise argparse.ArgumentTypeError(
                f"task {task_id!r} has no key: give ID:KEY or set ANYLEARN_SECRET_KEY"
            )
    return task_id, key


def _duration(*, positive: bool = False, unlimited: bool = True, unit: str = "seconds") -> Callable[[str], float]:
    """An argparse type for a duration option, checked by config's one rule (:func:`~reporter.config.duration_problem`)."""
    from .checks import MAX_DURATION_S, duration_problem

    def parse(text: str) -> float:
        problem = duration_problem(text.strip(), positive=positive, unlimited=unlimited, unit=unit)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return min(float(text), MAX_DURATION_S)

    parse.__name__ = "duration"
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, not {text[:40]!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535 (0 picks a free one), not {text[:40]!r}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from .emulator.server import Faults, serve_command

    faults = Faults(
        latency_ms=args.latency_ms, fail_first=args.fail_first, fail_rate=args.fail_rate,
        retry_after_s=args.retry_after, seed=args.seed,
    )
    token = args.token if args.token is not None else (os.environ.get(ENV_AUTH_TOKEN) or os.environ.get(ENV_TOKEN) or None)
    anyboard = None if args.anyboard_port is None else {  # a container's own variables serve as the login too
        "port": args.anyboard_port, "user": args.anyboard_user or os.environ.get(ENV_ANYBOARD_USER) or "root",
        "password": args.anyboard_password or os.environ.get(ENV_ANYBOARD_PASSWORD) or "root"}
    return serve_command(dict(args.task), host=args.host, port=args.port, db_path=args.db, faults=faults,
                         verbose=args.verbose, token=token, idle_timeout_s=args.idle_timeout, anyboard=anyboard)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the local AnyLearn backend emulator",
        formatter_class=_formatter,
        description="An AnyLearn-compatible backend on loopback, for trying a container end to end.",
        epilog=(
            "example:\n  ANYLEARN_SECRET_KEY=s3cret anylearn-reporter serve --port 8080 --task TRAIdemo\n"
            "  then: ANYLEARN_BACKEND_URL=http://127.0.0.1:8080/api ANYLEARN_TASK_ID=TRAIdemo "
            "ANYLEARN_SECRET_KEY=s3cret python train.py"
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--db", default=":memory:", metavar="PATH", help="sqlite database file (default in-memory)")
    p.add_argument("--task", action="append", type=_task_arg, default=[], metavar="ID[:KEY]",
                   help="a task it accepts; without :KEY the key comes from ANYLEARN_SECRET_KEY (repeatable)")
    p.add_argument("--latency-ms", type=_duration(unlimited=False, unit="milliseconds"), default=0.0, help="delay every POST by this many ms")
    p.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer the first N POSTs with 503")
    p.add_argument("--fail-rate", type=_probability, default=0.0, metavar="P", help="answer POSTs with 503 at probability P")
    p.add_argument("--retry-after", type=_duration(unlimited=False), default=None, metavar="S",
                   help="injected failures become 429 with Retry-After: S")
    p.add_argument("--seed", type=int, default=None, help="seed for --fail-rate")
    p.add_argument("--token", default=None, metavar="T",
                   help="the bearer token reads and a local task's agent accept (default: env ANYLEARN_AUTH_TOKEN, else "
                        "ANYLEARN_TOKEN; with none, any bearer token); reads also accept the task's Secret-Key, "
                        "metric writes only that")
    p.add_argument("--idle-timeout", type=_duration(positive=True), default=30.0, metavar="S",
                   help="close a connection silent for S seconds (default 30)")
    p.add_argument("--anyboard-port", type=_port, default=None, metavar="PORT",
                   help="also serve a local Anyboard: IoTDB's client wire on PORT (0 picks one), its curves at /anyboard "
                        "and the read API /api/anyboard/... (needs the anyboard extra)")
    p.add_argument("--anyboard-user", default=None, metavar="USER",
                   help="the local Anyboard's IoTDB user (default: env ANYLEARN_ANYBOARD_IOTDB_USER, else root)")
    p.add_argument("--anyboard-password", default=None, metavar="PW",
                   help="the local Anyboard's IoTDB password (default: env ANYLEARN_ANYBOARD_IOTDB_PASSWORD, else root, "
                        "IoTDB's own default; prefer the variable: an argv is visible to every user)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=_cmd_serve)


def _cmd_run(args: argparse.Namespace) -> int:
    from .wrapper import run

    return run(args)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="launch and supervise a training command, reporting for it",
        formatter_class=_formatter,
        description=(
            "Build the command from ANYLEARN_ENTRYPOINT (or the words after --) and the hyper-parameters, "
            "prepare the output directory, run it in its own process group, pass its output through, read "
            "metric lines, report the task state, forward signals, and deliver the journal. Exits with the "
            "command's exit code (128+N when it died of signal N)."
        ),
        epilog=(
            "examples:\n"
            "  anylearn-reporter run --params '{\"lr\": 0.01, \"epochs\": 3}' -- python train.py\n"
            "  ANYLEARN_ENTRYPOINT='python train.py' ANYLEARN_TRAIN_PARAMS='{\"lr\": 0.01}' anylearn-reporter run\n"
            "  anylearn-reporter run --nproc-per-node 2 -- python train_ddp.py\n"
            "  anylearn-reporter run --nni --params '{\"lr\": 0.01}' -- python trial.py\n"
            "  anylearn-reporter run --tensorboard-dir runs --tensorboard-tag val/acc -- python train.py\n"
            "metric lines the command may print:\n"
            "  ANYLEARN_METRIC 0.93 | ANYLEARN_METRIC {\"value\": 0.93, \"step\": 5} | ANYLEARN_FINAL_METRIC 0.95"
        ),
    )
    params = p.add_argument_group("hyper-parameters")
    params.add_argument("--params", metavar="JSON", help="a JSON object (default: ANYLEARN_TRAIN_PARAMS, else {})")
    params.add_argument("--params-file", metavar="FILE", help="read the JSON object from FILE")
    params.add_argument("--params-prefix", metavar="P", help="put before each key (ANYLEARN_TRAIN_PARAMS_PREFIX, default --)")
    params.add_argument("--params-delimiter", metavar="D",
                        help="between key and value (ANYLEARN_TRAIN_PARAMS_DELIMITER, default a space: two argv elements)")
    p.add_argument("--output", metavar="DIR", help="relative output directory (ANYLEARN_OUTPUT, default output)")
    p.add_argument("--grace-period", metavar="S", help="seconds between a forwarded signal and SIGKILL (ANYLEARN_GRACE_PERIOD, default 30)")
    p.add_argument("--drain-timeout", metavar="S", help="seconds to deliver pending records after the command ends (ANYLEARN_DRAIN_TIMEOUT, default 60)")
    p.add_argument("--metric-pattern", action="append", metavar="REGEX",
                   help="a regex with a named group 'value' (and optional 'name', 'step') read from output lines; repeatable (ANYLEARN_METRIC_PATTERNS, one per line)")
    p.add_argument("--nnodes", metavar="N", help="nodes of a distributed run (ANYLEARN_NUM_NODES, default 1)")
    p.add_argument("--nproc-per-node", metavar="N", help="processes per node (ANYLEARN_NPROC_PER_NODE, default 1); more than one process in all launches through torchrun")
    p.add_argument("--isolate-secret", action="store_true", help="give the command no secret key nor user token (the wrapper delivers for it)")
    p.add_argument("--dry-run", action="store_true", help="print the final argv and the environment it would add, then exit")
    p.add_argument("--nni", action="store_true",
                   help="run an unchanged NNI trial: nni.get_next_parameter() gets the hyper-parameters, its results are reported (ANYLEARN_NNI=1)")
    _add_tensorboard_options(p)
    p.add_argument("--autolog", action="store_true",
                   help="report from the command's transformers, Lightning, Keras, XGBoost and LightGBM trainers without changing its code (ANYLEARN_AUTOLOG=1)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    p.set_defaults(func=_cmd_run)


def _cmd_sidecar(args: argparse.Namespace) -> int:
    from .sidecar import run

    return run(args)


def _add_sidecar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sidecar",
        help="deliver a run's journal from a sidecar container, sample resources, heartbeat",
        formatter_class=_formatter,
        description=(
            "Runs beside the training container, sharing the reporter directory. Delivers the run's journal, "
            "samples resources into resources.jsonl and heartbeats, until summary.json appears, the watched "
            "process is gone or SIGTERM; then drains. Exit 0: all delivered; 3: records stay pending."
        ),
        epilog="example:\n  ANYLEARN_TASK_ID=TRAIx ANYLEARN_SECRET_KEY=... ANYLEARN_REPORTER_DIR=/shared anylearn-reporter sidecar",
    )
    p.add_argument("--interval", metavar="S", help="seconds between resource samples (ANYLEARN_RESOURCE_INTERVAL, default 10)")
    p.add_argument("--heartbeat", metavar="S", help="seconds between heartbeats (default 30)")
    p.add_argument("--pid", type=int, metavar="PID", help="the process tree to watch (default: the child the wrapper records)")
    p.add_argument("--drain-timeout", metavar="S", help="seconds to deliver what is pending at the end (ANYLEARN_DRAIN_TIMEOUT, default 60)")
    _add_tensorboard_options(p)
    p.set_defaults(func=_cmd_sidecar)


def _add_tensorboard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard-dir", metavar="DIR",
                   help="journal the scalars of every TensorBoard event file under DIR, relative to the output directory "
                        "when relative (ANYLEARN_TENSORBOARD_DIR)")
    p.add_argument("--tensorboard-tag", metavar="TAG",
                   help="the scalar tag that is the objective metric, sent to the backend; other tags are journalled (ANYLEARN_TENSORBOARD_TAG)")


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import status_command

    return status_command(args.run_dir, as_json=args.json, stale_after_s=args.stale_after)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="a run's delivery state; exit 0 while healthy, 1 when paused or stuck (for probes)",
        formatter_class=_formatter,
        description="Records journalled, delivered, pending and rejected, last delivery, last error and deliverer pid.",
        epilog="example (a Kubernetes liveness probe):\n  anylearn-reporter status --stale-after 600",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="default: this task's run directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--stale-after", type=_duration(), metavar="S",
                   help="for probes: healthy while delivery has failed or stalled less than S seconds (default: a failed "
                        "last attempt is unhealthy at once, records pending 300 s with no delivery are stalled)")
    p.set_defaults(func=_cmd_status)


def _cmd_show(args: argparse.Namespace) -> int:
    from .status import show_command

    return show_command(args.run_dirs, as_json=args.json, metrics=args.metrics)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="a table of runs: state, records, metrics and a sparkline",
        formatter_class=_formatter,
        description="Every run under the reporter directory (newest first), or the given run directories.",
        epilog="examples:\n  anylearn-reporter show\n  anylearn-reporter show anylearn-runs/TRAIx --metrics\n  anylearn-reporter show --json",
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--metrics", action="store_true", help="list the records of the runs")
    p.set_defaults(func=_cmd_show)


def _cmd_sync(args: argparse.Namespace) -> int:
    from .sync import Terminated, sync_command

    try:
        return sync_command(args.run_dirs, task_id=args.task_id, backend_url=args.backend_url,
                            secret_key_file=args.secret_key_file, timeout_s=args.timeout)
    except Terminated:
        return 128 + signal.SIGTERM


def _add_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="deliver what run directories left pending (offline runs, outages, a rejected key)",
        formatter_class=_formatter,
        description=(
            "Delivers the pending records of each RUN_DIR in order. Interrupted and run again, each record "
            "still reaches the backend once. The secret key comes from ANYLEARN_SECRET_KEY (or secret_key) or "
            "--secret-key-file, never from an argument. Exit 0: all delivered; 3: records stay pending."
        ),
        epilog="example:\n  ANYLEARN_SECRET_KEY=... anylearn-reporter sync anylearn-runs/offline-20261125-101500-3fa2c1 --task-id TRAIx",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--task-id", help="the task the records belong to (default: ANYLEARN_TASK_ID, else the run directory's name)")
    p.add_argument("--backend-url", metavar="URL", help="API base (default: ANYLEARN_BACKEND_URL, BACKEND_NAMESPACE, AnyLearn's default)")
    p.add_argument("--secret-key-file", metavar="FILE", help="read the secret key from FILE")
    p.add_argument("--timeout", type=_duration(), metavar="S", help="give up after S seconds (default or inf: until delivered; Ctrl-C stops safely)")
    p.set_defaults(func=_cmd_sync)


def _number_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from . import api

    check_secret_key()  # a key that cannot be sent is a usage error here (exit 2), not a silent offline run
    check_task_id()
    check_backend_url()
    config = load_config_strict()  # any other problem (ANYLEARN_FLUSH_TIMEOUT=nan) too: the hook would only warn
    # The run directory is resolved once: an offline run's name is new at each resolution.
    if not os.path.isabs(os.environ.get(ENV_RUN_DIR, "").strip()):
        os.environ[ENV_RUN_DIR] = config.run_dir
    problem = _journal_problem()
    if problem:
        print(f"anylearn-reporter: error: {problem}", file=sys.stderr)
        return EXIT_NOT_JOURNALLED

    if not api.try_report_metric(args.value, step=args.step, name=args.name, final=args.final):
        return EXIT_NOT_JOURNALLED  # the writer said why, once (e.g. ENOSPC)
    return EXIT_OK


def _journal_problem() -> Optional[str]:
    """Why the run's journal cannot be opened for appending (one line naming the path and the fix), or None."""

    run_dir = load_config()[0].run_dir
    try:
        os.makedirs(run_dir, exist_ok=True)
        os.close(os.open(os.path.join(run_dir, JOURNAL_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        return (f"cannot journal the record in {run_dir}: {why}; nothing was reported: "
                f"set {ENV_REPORTER_DIR} (or {ENV_RUN_DIR}) to a directory you can write")
    return None


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="report a metric from a shell script or any language",
        formatter_class=_formatter,
        description=(
            "Journals VALUE into the current run like the in-process API (under the wrapper: the wrapper's run). "
            "Outside the wrapper it delivers before exiting, for up to ANYLEARN_FLUSH_TIMEOUT seconds."
        ),
        epilog="examples:\n  anylearn-reporter report 0.93 --step 5\n  anylearn-reporter report 0.95 --final",
    )
    p.add_argument("value", type=_number_arg, metavar="VALUE")
    p.add_argument("--final", action="store_true", help="the task's final metric")
    p.add_argument("--step", type=int, metavar="N")
    p.add_argument("--name", metavar="NAME", help="the metric's name (only the objective metric is sent)")
    p.set_defaults(func=_cmd_report)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_command

    return doctor_command()


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check what a run would use and say what is wrong",
        formatter_class=_formatter,
        description=(
            "Checks the task id and key (redacted), the backend URL and how it was resolved, the route (direct or "
            "the proxy), DNS and TCP to the first hop, an authenticated read through that route, the clock, the reporter directory and its free space, torch and NVML. "
            "Exit 0 when a run would report, 1 otherwise."
        ),
        epilog="example:\n  anylearn-reporter doctor",
    )
    p.set_defaults(func=_cmd_doctor)


def _cmd_ui(args: argparse.Namespace) -> int:
    from .ui.server import ui_command

    config, _ = load_config()
    paths = args.paths or [config.reporter_dir]
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        print(f"anylearn-reporter: no directory {missing[0]}: give a run directory or a reporter directory "
              f"(default {ENV_REPORTER_DIR}, now {config.reporter_dir})", file=sys.stderr)
        return EXIT_USAGE
    return ui_command(paths, port=args.port, default_mode=config.objective_mode)


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="a local page of every run's curves, read from the run directories",
        formatter_class=_formatter,
        description=(
            "Serves one page on 127.0.0.1: the runs with state, duration, objective, best and final; per run every "
            "named metric as a chart (attempts drawn apart), the resource samples, the hyper-parameters (params.json) "
            "and the failure reason; one metric of several runs overlaid. Reads the run directories directly and "
            "follows them as they grow; needs no backend and loads nothing from elsewhere."
        ),
        epilog="examples:\n  anylearn-reporter ui\n  anylearn-reporter ui anylearn-runs/TRAI1 anylearn-runs/TRAI2 --port 8091",
    )
    p.add_argument("paths", nargs="*", metavar="RUN_DIR_OR_REPORTER_DIR",
                   help=f"run directories, or directories of runs (default: {ENV_REPORTER_DIR}, else ./anylearn-runs)")
    p.add_argument("--port", type=int, default=DEFAULT_UI_PORT, help=f"the port on 127.0.0.1 (default {DEFAULT_UI_PORT})")
    p.set_defaults(func=_cmd_ui)


_COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    _add_run, _add_sidecar, _add_sync, _add_report, _add_show, _add_status, _add_doctor, _add_serve, _add_ui,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anylearn-reporter",
        formatter_class=_formatter,
        description="The in-container training reporter for AnyLearn.",
        epilog="example:\n  anylearn-reporter run -- python train.py --lr 0.01",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"anylearn-reporter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for adder in _COMMANDS:
        adder(sub)
    return parser


def _escape_unprintable_output() -> None:
    """Text our output cannot encode (a lone surrogate in a metric name or a backend's reason, a character
    outside a non-UTF-8 terminal's charset) is printed as its backslash escape, never a traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - not a TextIOWrapper (a test's capture, a redirect): leave it
            pass


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    _escape_unprintable_output()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command: Optional[List[str]] = None
    if argv[:1] == ["run"] and "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"anylearn-reporter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `show --metrics | head`: the reader has gone; nothing more to say to it
        _silence_stdout()
        return 128 + signal.SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


