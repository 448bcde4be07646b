"""Started by Python at startup in every process of an ``anylearn-reporter run --autolog`` command.

It first runs the ``sitecustomize`` this one hides (the next one on ``sys.path``), then, when
``ANYLEARN_AUTOLOG`` is set, calls ``reporter.autolog()``. It never stops the program: any trouble is
one line on stderr.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _say(what: str, exc: BaseException) -> None:
    sys.stderr.write(f"anylearn-reporter: autolog: {what}: {type(exc).__name__}: {exc}\n")


def _run_hidden_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _autolog() -> None:
    # The literal, not reporter.config.ENV_AUTOLOG: this runs before the package is known to be importable.
    if os.environ.get("ANYLEARN_AUTOLOG", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    try:
        import reporter  # noqa: F401
    except ImportError:  # the command's Python does not see the package: use the copy this file is in
        sys.path.append(os.path.dirname(os.path.dirname(_HERE)))
    from reporter.integrations.autolog import autolog

    autolog()


try:
    _run_hidden_sitecustomize()
except Exception as exc:
    _say("the sitecustomize it chains to failed", exc)
try:
    _autolog()
except Exception as exc:
    _say("could not start", exc)
