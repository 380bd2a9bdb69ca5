"""One exception type for every user-facing error, so callers (CLI, server) can report it."""

from __future__ import annotations


class PersonamixError(ValueError):
    """Bad input or an unusable model/adapter; the message names the problem."""


class SettingError(PersonamixError):
    """A sampling setting with a bad value; `param` names the setting (the server reports it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class EngineError(PersonamixError):
    """A remote inference engine failed a call; `status` is the HTTP status a front answers with:
    503 unreachable, 504 timed out, 502 any other engine failure."""

    status = 502


class EngineUnreachable(EngineError):
    status = 503


class EngineTimeout(EngineError):
    status = 504


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for wrapping it in one of ours; the exception's
    type when it has no message (some libraries raise bare exceptions)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or raise a PersonamixError saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PersonamixError(f"{what} needs the Python package {module.split('.')[0]!r}, which is not "
                              f"installed: pip install 'personamix[{extra}]'") from None
