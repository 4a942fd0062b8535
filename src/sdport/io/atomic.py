"""Atomic publication of outputs: temp file beside the target → fsync → rename → fsync the folder.

A crash, Ctrl-C, ``kill -9`` or a full disk leaves no file at the target; temp files of dead
processes are removed by the next run that writes into the same folder.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil

from ..errors import OutputError

_TMP = re.compile(r"^\.(?P<name>.+)\.sdport-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str) -> None:
    """Delete sdport temp files in ``folder`` whose writing process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def temp_name(target: str) -> str:
    folder, base = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{base}.sdport-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(target: str, *, force: bool, inputs: list[str], need_bytes: int = 0) -> None:
    """Refuse a target that exists (without ``force``), that is an input, or that will not fit."""
    target = os.path.abspath(target)
    real_target = os.path.realpath(target)
    for src in inputs:
        same = os.path.exists(target) and os.path.exists(src) and os.path.samefile(src, target)
        inside = os.path.commonpath([os.path.realpath(src), real_target]) == real_target
        if same or inside:  # replacing a folder that holds an input would delete the input
            raise OutputError(target, "output would overwrite the input", "choose another output path")
    if os.path.lexists(target) and not force:
        raise OutputError(target, "output already exists", "pass --force to replace it")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise OutputError(target, "output folder does not exist", f"create {folder} first")
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OutputError(target, f"not enough free space (need {need_bytes / 1e6:.1f} MB, "
                          f"free {free / 1e6:.1f} MB)", "free some space or write elsewhere")


def disk_error(target: str, exc: OSError) -> OutputError:
    """An OutputError for a failed write, saying plainly when the disk is full."""
    if exc.errno in _DISK_ERRNOS:
        return OutputError(target, f"no space left or file too large while writing ({os.strerror(exc.errno)})",
                           "free some space or write elsewhere")
    return OutputError(target, f"cannot write output: {exc.strerror or exc}", None)


class _Atomic:
    """What AtomicFile and AtomicDir share: a temp name beside the target, made by ``_create``, removed on failure.

    Use as a context manager: leaving the block without ``commit`` (an exception, Ctrl-C) aborts.
    """

    def __init__(self, target: str, *, force: bool = False):
        self.target = os.path.abspath(target)
        self.force = force
        remove_stale_temps(os.path.dirname(self.target))
        self.tmp = temp_name(self.target)
        try:
            self._create()
        except OSError as exc:
            raise disk_error(self.target, exc) from exc
        self.done = False

    def _create(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Atomic:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.abort()


class AtomicFile(_Atomic):
    """A file written under a temp name and renamed onto ``target`` only by ``commit``."""

    def _create(self) -> None:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            publish(self.tmp, self.target, force=self.force)
        except OSError as exc:
            self.abort()
            raise disk_error(self.target, exc) from exc
        self.done = True

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
        self.done = True


def write_atomic(target: str, data: bytes, *, force: bool = True) -> None:
    """Write a small file whole, atomically (a report, a manifest): its old content or the new one, never half."""
    out = AtomicFile(target, force=force)
    with out:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(out.fd, view):]
        except OSError as exc:
            raise disk_error(target, exc) from exc
        out.commit()


def publish(tmp: str, target: str, *, force: bool) -> None:
    """Rename ``tmp`` onto ``target`` (refusing to replace it unless ``force``) and fsync the folder."""
    if force:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)  # fails atomically if the target appeared meanwhile
        except FileExistsError:
            raise OutputError(target, "output already exists", "pass --force to replace it") from None
        except OSError:
            if os.path.lexists(target):
                raise OutputError(target, "output already exists", "pass --force to replace it") from None
            os.rename(tmp, target)
        else:
            os.unlink(tmp)
    fsync_dir(os.path.dirname(target))


class AtomicDir(_Atomic):
    """A folder built under a temp name beside ``target`` and renamed onto it only by ``commit``.

    With ``force``, an existing target is moved aside, replaced, then deleted, so the target path
    always holds either the old folder or the complete new one.
    """

    def _create(self) -> None:
        os.mkdir(self.tmp)

    def path(self, relative: str) -> str:
        """Where to write ``relative`` (a path sdport chose) inside the folder; its parent folders are made."""
        full = os.path.join(self.tmp, relative)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a small file (a config, a tokenizer file) and flush it to disk."""
        try:
            fd = os.open(self.path(relative), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise disk_error(self.target, exc) from exc

    def commit(self) -> None:
        """Flush every folder, then swap the new folder in; on any failure or signal the old target is put back.

        The old folder waits under a name the stale-temp cleaner never deletes (``.<name>.sdport-old-…``),
        so even a ``kill -9`` between the two renames loses nothing.
        """
        if os.path.lexists(self.target) and not self.force:
            self.abort()
            raise OutputError(self.target, "output already exists", "pass --force to replace it")
        old = None
        try:
            for folder, _, _ in os.walk(self.tmp):
                fsync_dir(folder)
            if os.path.lexists(self.target):
                old = temp_name(self.target).replace(".sdport-", ".sdport-old-")
                os.rename(self.target, old)
            os.rename(self.tmp, self.target)
        except BaseException as exc:
            if old is not None and not os.path.lexists(self.target):
                os.rename(old, self.target)
            self.abort()
            if isinstance(exc, OSError):
                raise disk_error(self.target, exc) from exc
            raise
        self.done = True
        fsync_dir(os.path.dirname(self.target))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True
