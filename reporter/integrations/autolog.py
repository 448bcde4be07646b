"""Autolog: hook every supported trainer, imported before or after the call, without a code change.

:func:`autolog` patches the trainers of the frameworks already imported and installs a post-import
hook (a ``sys.meta_path`` finder whose loader runs the patch right after the framework's module has
executed) for those imported later:

- ``transformers.Trainer`` gets :class:`reporter.integrations.transformers.AnylearnCallback`;
- a Lightning ``Trainer`` (``lightning`` and ``pytorch_lightning``) gets
  :class:`reporter.integrations.lightning.AnylearnLogger` beside the user's own loggers;
- ``keras.Model.fit`` gets :class:`reporter.integrations.keras.AnylearnCallback`;
- ``xgboost.train`` (so ``XGBModel.fit``) and ``lightgbm.train`` (so ``LGBMModel.fit``) get their
  callbacks;
- the trackers' log calls (MLflow's ``MlflowClient``, W&B's ``Run.log``, DVCLive's ``Live.log_metric``)
  are followed by the bridges of :mod:`reporter.integrations.mlflow`, ``.wandb`` and ``.dvclive``.

A trainer that already has ours is not given a second one. A patch never breaks a run: when a
framework's internals have moved, it says so once and training goes on unhooked.

``anylearn-reporter run --autolog`` (or ``ANYLEARN_AUTOLOG=1``) turns this on for a command without
touching its code: :func:`autolog_environment` puts a directory holding a ``sitecustomize`` module
first on the command's ``PYTHONPATH``; that module runs any ``sitecustomize`` it hides, then calls
:func:`autolog` when ``ANYLEARN_AUTOLOG`` is set. This module imports no framework itself.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from ..config import ENV_AUTOLOG
from ..log import get_logger, say_once

__all__ = ["autolog", "autolog_requested", "autolog_environment", "SITE_DIR", "FRAMEWORKS"]

SITE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_autolog_site")
MARK = "__anylearn_autolog__"
TRUE_WORDS = ("1", "true", "yes", "on")

_lock = threading.RLock()
_watch: Dict[str, tuple] = {}  # module name -> (framework, patch), for the frameworks enabled


def _say_once(framework: str, what: str) -> None:
    """A framework's first trouble, said once per process (later ones, whatever they are, are not)."""
    say_once(("autolog", framework), "autolog: %s: %s; training goes on without it", framework, what)


def _safely(framework: str, action: Callable[[], Any], default: Any = None) -> Any:
    """Run ``action``; on any failure say so once for ``framework`` and return ``default``."""
    try:
        return action()
    except Exception as exc:  # a framework's internals moved: never into training
        _say_once(framework, f"cannot hook it ({type(exc).__name__}: {exc})")
        return default


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``owner.name`` by ``make(original)`` unless it is ours already; True when it is ours now."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return True
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)
    return True


def _with_callback(
    original: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any], parameter: str,
    ours: type, make: Callable[[], Any],
) -> tuple:
    """The call's arguments with one of ``ours`` added to the list argument ``parameter`` (unless one is
    there already), and the instance of ours in it."""
    import inspect  # on the first hooked call, not at `import reporter`

    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    given = bound.arguments.get(parameter)
    if given is None:
        callbacks: List[Any] = []
    elif isinstance(given, (list, tuple)):
        callbacks = list(given)
    else:
        raise TypeError(f"{parameter} is a {type(given).__name__}, not a list")
    present = [cb for cb in callbacks if isinstance(cb, ours)]
    if present:
        return args, kwargs, present[0]
    instance = make()
    bound.arguments[parameter] = callbacks + [instance]
    return bound.args, bound.kwargs, instance


# --- one patch per framework ------------------------------------------------------------------------


def _after_init(cls: Any, framework: str, give: Callable[[Any], None]) -> None:
    """Patch ``cls.__init__`` so that each new instance is handed to ``give`` (safely) once it is built."""
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            _safely(framework, lambda: give(self))

        return __init__

    _wrap(cls, "__init__", make)


def _patch_transformers(module: Any) -> None:
    _after_init(module.Trainer, "transformers", _give_transformers_callback)


def _give_transformers_callback(trainer: Any) -> None:
    from .transformers import AnylearnCallback

    if not any(isinstance(cb, AnylearnCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(AnylearnCallback())


def _patch_lightning(module: Any) -> None:
    _after_init(module.Trainer, "lightning", _give_lightning_logger)


def _give_lightning_logger(trainer: Any) -> None:
    from .lightning import AnylearnLogger

    loggers = list(trainer.loggers)
    if any(isinstance(logger, AnylearnLogger) for logger in loggers):
        return
    if not loggers:
        # logger=False: a sole logger of ours would move the checkpoints under its name; respect the choice.
        _say_once("lightning", "this Trainer has logger=False, so autolog adds no logger (pass logger=AnylearnLogger())")
        return
    trainer.loggers = loggers + [AnylearnLogger()]


def _adding_our_callback(framework: str, module_name: str, class_name: str,
                         after_call: Optional[Callable[[Any], None]] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper maker for a training call taking ``callbacks=[...]``: it adds one of our ``class_name``
    (from ``reporter.integrations.<module_name>``) unless the call has one, and gives the instance to
    ``after_call`` once the call returns. Any trouble of ours is said once and the call goes on unhooked."""
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            def hooked() -> tuple:
                import importlib

                ours = getattr(importlib.import_module(f".{module_name}", __package__), class_name)
                return _with_callback(original, args, kwargs, "callbacks", ours, ours)

            call_args, call_kwargs, instance = _safely(framework, hooked, (args, kwargs, None))
            result = original(*call_args, **call_kwargs)
            if instance is not None and after_call is not None:
                _safely(framework, lambda: after_call(instance))
            return result

        return call

    return make


def _patch_keras(module: Any) -> None:
    _wrap(module.Model, "fit", _adding_our_callback("keras", "keras", "AnylearnCallback"))


def _patch_train_functions(framework: str, modules: Iterable[Any], make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wrap ``train`` once and point every module's ``train`` that names the same function at the wrapper."""
    modules = [m for m in modules if m is not None and hasattr(m, "train")]
    if not modules:
        raise AttributeError(f"no {framework}.train found")
    original = modules[0].train
    if getattr(original, MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, MARK, True)
    for module in modules:
        if module.train is original:
            module.train = wrapper


def _patch_xgboost(module: Any) -> None:
    _patch_train_functions(
        "xgboost", [sys.modules.get("xgboost.training"), module, sys.modules.get("xgboost.sklearn")],
        _adding_our_callback("xgboost", "xgboost", "AnylearnCallback"),
    )


def _patch_lightgbm(module: Any) -> None:
    # LightGBM tells callbacks nothing when it stops early: the final metric is reported when train returns.
    _patch_train_functions(
        "lightgbm", [sys.modules.get("lightgbm.engine"), module, sys.modules.get("lightgbm.sklearn")],
        _adding_our_callback("lightgbm", "lightgbm", "AnylearnLightGBMCallback", after_call=lambda ours: ours.finish()),
    )


def _then_ours(framework: str, function_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper maker for a tracker's method: the tracker's own call runs first and alone decides the
    outcome (its exception reaches the caller untouched, and nothing is reported); once it has returned,
    ``reporter.integrations.<framework>.<function_name>`` is given the same arguments, safely."""
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        ours: List[Callable[..., Any]] = []  # looked up on the first call: the tracker is imported by then

        def call(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            try:
                if not ours:
                    import importlib

                    ours.append(getattr(importlib.import_module(f".{framework}", __package__), function_name))
                ours[0](*args, **kwargs)
            except Exception as exc:  # never into training
                _say_once(framework, f"cannot report this call ({type(exc).__name__}: {exc})")
            return result

        return call

    return make


def _follow(framework: str, owner: Any, names: Iterable[str]) -> None:
    """Wrap each method ``names`` of ``owner`` with :func:`_then_ours` (a missing one: said once by the caller)."""
    for name in names:
        getattr(owner, name)  # all present, or none wrapped
    for name in names:
        _wrap(owner, name, _then_ours(framework, name))


def _patch_mlflow(module: Any) -> None:
    _follow("mlflow", module.MlflowClient, ("log_metric", "log_batch", "log_param", "set_terminated"))


WANDB_OFFLINE_WHY = ("no W&B login (WANDB_API_KEY, `wandb login`'s netrc entry, a settings file's api_key) "
                     "and no WANDB_MODE: W&B runs offline, reaching no network "
                     "(sync later with `wandb sync`; WANDB_MODE=online to change)")
WANDB_DEFAULT_HOST = "https://api.wandb.ai"


def _wandb_settings(env: Mapping[str, str]) -> Dict[str, str]:
    """The ``[default]`` section of W&B's settings files (global: ``WANDB_CONFIG_DIR`` or
    ``~/.config/wandb``; local: ``./wandb``), the local one winning; empty when unreadable."""
    import configparser

    config_dir = env.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read([os.path.join(config_dir, "settings"), os.path.join("wandb", "settings")])
        return dict(parser["default"]) if parser.has_section("default") else {}
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}


def _wandb_logged_in(env: Mapping[str, str]) -> bool:
    """Whether W&B has an account here without WANDB_API_KEY: a settings file's ``api_key`` or ``mode``, or
    (as ``wandb login`` writes it) a netrc entry with a password for W&B's host (``WANDB_BASE_URL``, a
    settings file's ``base_url``, else api.wandb.ai) in ``NETRC``'s file, ``~/.netrc`` or ``~/_netrc``.
    Only whether one is there is read: the key itself is never kept."""
    import netrc
    from urllib.parse import urlsplit

    settings = _wandb_settings(env)
    if settings.get("api_key") or settings.get("mode"):
        return True
    host = env.get("WANDB_BASE_URL") or settings.get("base_url") or WANDB_DEFAULT_HOST
    machine = urlsplit(host.strip()).netloc or host.strip()
    home = os.path.expanduser("~")
    path = env.get("NETRC") or next((p for p in (os.path.join(home, ".netrc"), os.path.join(home, "_netrc"))
                                     if os.path.exists(p)), "")
    if not path or not machine:
        return False
    try:
        entry = netrc.netrc(os.path.expanduser(path)).authenticators(machine)
    except (netrc.NetrcParseError, OSError, UnicodeDecodeError):
        return False
    return bool(entry and entry[2])


def _patch_wandb(module: Any) -> None:
    _follow("wandb", module.Run, ("log", "finish"))
    # Under `run --autolog` in a container without a W&B account, wandb.init() would wait for a login
    # or fail reaching the network; offline, the script runs as written and the run can be synced later.
    # A user logged in with `wandb login` (netrc) or a settings file keeps W&B as it was.
    env = os.environ
    if (env.get(ENV_AUTOLOG, "").strip().lower() in TRUE_WORDS and not env.get("WANDB_API_KEY")
            and not env.get("WANDB_MODE") and not _wandb_logged_in(env)):
        env["WANDB_MODE"] = "offline"
        get_logger().info("autolog: wandb: %s", WANDB_OFFLINE_WHY)


def _patch_dvclive(module: Any) -> None:
    _follow("dvclive", module.Live, ("log_metric", "log_params", "end"))


# framework -> {module whose execution completes the objects to patch: patch}
FRAMEWORKS: Dict[str, Dict[str, Callable[[Any], None]]] = {
    "transformers": {"transformers.trainer": _patch_transformers},
    "lightning": {
        "lightning.pytorch.trainer.trainer": _patch_lightning,
        "pytorch_lightning.trainer.trainer": _patch_lightning,
    },
    "keras": {"keras": _patch_keras},
    "xgboost": {"xgboost": _patch_xgboost},
    "lightgbm": {"lightgbm": _patch_lightgbm},
    "mlflow": {"mlflow.tracking.client": _patch_mlflow},
    "wandb": {"wandb.sdk.wandb_run": _patch_wandb},
    "dvclive": {"dvclive.live": _patch_dvclive},
}


# --- the post-import hook ---------------------------------------------------------------------------


class _PatchingLoader:
    """Delegates to the module's own loader, then runs the patch on the executed module."""

    def __init__(self, loader: Any, framework: str, patch: Callable[[Any], None]) -> None:
        self._loader = loader
        self._framework = framework
        self._patch = patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _safely(self._framework, lambda: self._patch(module))

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_filename, is_package...
        return getattr(self._loader, name)


class _PostImportFinder:
    """Finds nothing itself: for a watched module it asks the other finders and wraps their loader.
    (Duck-typed, as ``sys.meta_path`` allows: importing ``importlib.abc`` would slow ``import reporter``.)"""

    def __init__(self) -> None:
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        watched = _watch.get(fullname)  # every import of the process passes here: one dict lookup
        if watched is None or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.name = None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, *watched)  # type: ignore[assignment]  # duck-typed Loader
        return spec


_finder: Optional[_PostImportFinder] = None


def autolog(frameworks: Optional[Iterable[str]] = None) -> List[str]:
    """Report from every supported trainer without changing the training code.

    ``frameworks``: a subset of ``transformers``, ``lightning``, ``keras``, ``xgboost``, ``lightgbm``,
    ``mlflow``, ``wandb``, ``dvclive`` (default all). Trainers imported already are patched now, the others when they are imported. Safe
    to call more than once. Returns the frameworks hooked so far (imported and patched).
    """
    global _finder
    wanted = list(FRAMEWORKS) if frameworks is None else list(frameworks)
    unknown = [name for name in wanted if name not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"autolog knows {', '.join(FRAMEWORKS)}; not {', '.join(unknown)}")
    with _lock:
        _watch.update({module: (name, patch) for name in wanted for module, patch in FRAMEWORKS[name].items()})
        if _finder is None:
            _finder = _PostImportFinder()
            sys.meta_path.insert(0, _finder)
        for framework in wanted:
            for module_name, patch in FRAMEWORKS[framework].items():
                module = sys.modules.get(module_name)
                if module is not None and getattr(module, "__spec__", None) is not None:
                    _safely(framework, functools.partial(patch, module))
    return hooked()


def hooked() -> List[str]:
    """The frameworks whose trainer carries our patch in this process."""
    found = []
    probes = {
        "transformers": lambda: sys.modules["transformers.trainer"].Trainer.__init__,
        "lightning": lambda: (sys.modules.get("lightning.pytorch.trainer.trainer") or sys.modules["pytorch_lightning.trainer.trainer"]).Trainer.__init__,
        "keras": lambda: sys.modules["keras"].Model.fit,
        "xgboost": lambda: sys.modules["xgboost"].train,
        "lightgbm": lambda: sys.modules["lightgbm"].train,
        "mlflow": lambda: sys.modules["mlflow.tracking.client"].MlflowClient.log_metric,
        "wandb": lambda: sys.modules["wandb.sdk.wandb_run"].Run.log,
        "dvclive": lambda: sys.modules["dvclive.live"].Live.log_metric,
    }
    for framework, probe in probes.items():
        try:
            if getattr(probe(), MARK, False):
                found.append(framework)
        except (KeyError, AttributeError):
            pass
    return found


# --- `run --autolog` --------------------------------------------------------------------------------


def autolog_requested(args: Any, env: Mapping[str, str]) -> bool:
    """True when ``run`` was given ``--autolog`` or ``ANYLEARN_AUTOLOG`` is set to a true word."""
    return bool(getattr(args, "autolog", False)) or env.get(ENV_AUTOLOG, "").strip().lower() in TRUE_WORDS


def autolog_environment(env: Mapping[str, str]) -> Dict[str, str]:
    """What ``run --autolog`` adds to the command's environment: ``ANYLEARN_AUTOLOG=1`` and our
    ``sitecustomize`` directory first on ``PYTHONPATH`` (it runs any ``sitecustomize`` it hides)."""
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    return {ENV_AUTOLOG: "1", "PYTHONPATH": os.pathsep.join([SITE_DIR, *existing])}
