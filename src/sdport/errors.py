"""Every user-facing failure of sdport: one base class carrying path, problem and hint.

The library raises these and never prints; only ``cli.py`` turns them into the one-line message
``sdport: error: <path>: <problem> (<hint>)`` with exit status 2.
"""

from __future__ import annotations

import os


class SdportError(Exception):
    """Bad input or a refused operation, described for the user.

    Args:
        path: the file (or archive entry) the problem is in; ``None`` when no file is involved.
        problem: what is wrong, in a few words.
        hint: what to do about it; optional.
    """

    exit_code = 2

    def __init__(self, path: str | os.PathLike[str] | None, problem: str, hint: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.hint = hint
        super().__init__(self.message())

    def message(self) -> str:
        text = self.problem if self.path is None else f"{self.path}: {self.problem}"
        return f"{text} ({self.hint})" if self.hint else text


class FormatError(SdportError, ValueError):
    """A file is malformed, truncated or not in any format sdport reads."""


class UnsafeFileError(SdportError, ValueError):
    """A file asks for something sdport will never do (a forbidden pickle global, a path escaping its folder)."""


class UnknownKeyError(SdportError, KeyError):
    """A tensor name no rule knows, or a plan that does not account for every input."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message()


class PlanError(SdportError, ValueError):
    """A conversion plan is inconsistent: a missing input, a shape mismatch, an output defined twice."""


class OutputError(SdportError, OSError):
    """The output cannot be written: it exists, it is an input, or the disk refused the bytes."""


class SourceNotFoundError(SdportError, FileNotFoundError):
    """The source path or URI does not lead to a file."""


class MissingExtraError(SdportError, ImportError):
    """A feature needs an optional dependency that is not installed: ``<feature> needs the '<extra>' extra
    (<modules> not installed) (pip install 'sdport[<extra>]')``."""

    def __init__(self, feature: str, extra: str, missing: tuple[str, ...] | list[str] = ()):
        what = f" ({', '.join(missing)} not installed)" if missing else ""
        super().__init__(None, f"{feature} needs the '{extra}' extra{what}", f"pip install 'sdport[{extra}]'")


class SourceError(SdportError, OSError):
    """A source could not be fetched: the server refused it, it is not there, the connection kept failing, or it is
    not in the cache when sdport runs offline."""


class HashMismatchError(SourceError):
    """Downloaded bytes whose SHA-256 is not the one the source publishes; nothing is kept."""
