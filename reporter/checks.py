"""Validators of options and variables, shared by the configuration and the commands: numbers, durations
and text files, each refused in one line naming what is wrong and how to fix it (:class:`ConfigError`).

A leaf: it imports nothing from the package, so :mod:`reporter.config` and any command can use it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """The environment or the command line holds a value the agent cannot use."""


def option_or_env(value: Optional[str], env: Mapping[str, str], *names: str) -> Optional[str]:
    """A command-line option's value when given, else the first of ``names`` set (and not empty) in ``env``."""
    if value is not None:
        return value
    for name in names:
        if env.get(name, "") != "":
            return env[name]
    return None


def parse_number(
    text: Optional[str], what: str, default: Any, *, integer: bool = False, minimum: float = 0.0, positive: bool = False
) -> Any:
    """A number from an option or a variable: ``default`` when unset or empty, ConfigError naming ``what``
    when it is not a (whole) number, is NaN, is below ``minimum``, or is not above 0 with ``positive``."""
    if text is None or str(text).strip() == "":
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"{what} must be {'a whole number' if integer else 'a number'}, not {text!r}") from None
    if value != value or value < minimum or (positive and value <= 0):
        bound = "more than 0" if positive else f"at least {minimum:g}"
        raise ConfigError(f"{what} must be {bound}, not {text!r}")
    return value


MAX_DURATION_S = 1_000_000.0  # ~11.6 days: "no limit" in practice, and within every wait's range (poll takes int ms)


def duration_problem(text: str, *, positive: bool = False, unlimited: bool = True, unit: str = "seconds") -> Optional[str]:
    """Why ``text`` cannot be a duration, as the end of a sentence (``must be ...``); None when it can.

    A duration is a number of ``unit``: not NaN, not negative (not 0 either with ``positive``). With
    ``unlimited``, ``inf`` (or anything above :data:`MAX_DURATION_S`) means "no limit"; without, it is refused.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    most = "" if unlimited else f" up to {MAX_DURATION_S:.0f}"
    if value != value or value < 0 or (positive and value == 0) or (not unlimited and value > MAX_DURATION_S):
        bound = "more than 0" if positive else "0 or more"
        no_limit = " (or inf for no limit)" if unlimited else ""
        return f"must be a number of {unit}, {bound}{most}{no_limit}, not {str(text)[:40]!r}"
    return None


def parse_duration(text: Optional[str], what: str, default: Any, *, positive: bool = False, unlimited: bool = True) -> Any:
    """The one parser of every duration (an option or a variable, in seconds): ``default`` when unset or empty;
    :class:`ConfigError` naming ``what`` for what :func:`duration_problem` refuses. "No limit" (inf, or
    more than :data:`MAX_DURATION_S`) comes back as :data:`MAX_DURATION_S`, so no wait, deadline or
    timestamp computed from it can overflow."""
    if text is None or str(text).strip() == "":
        return default
    problem = duration_problem(str(text).strip(), positive=positive, unlimited=unlimited)
    if problem:
        raise ConfigError(f"{what} {problem}")
    return min(float(text), MAX_DURATION_S)


def read_text_file(path: str, what: str, *, secret: bool = False) -> str:
    """The UTF-8 text of the file ``path`` given as ``what`` (``--params-file``); a UTF-8 byte-order mark is
    dropped. :class:`ConfigError` in one line names the file and what is wrong (unreadable, not UTF-8 text);
    with ``secret`` the message never shows a byte of the content."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bom = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        found = "it starts with a UTF-16 byte-order mark" if bom else (
            f"an invalid byte at offset {exc.start}" if secret else f"byte 0x{data[exc.start]:02x} at offset {exc.start} is invalid")
        raise ConfigError(f"{what} {path} is not UTF-8 text ({found}); save it as UTF-8") from None
