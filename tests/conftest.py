"""Shared fixtures: the demo SD1 checkpoint, and a runner for the CLI as a separate process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

#: every test shares one traced-graph cache (sdport.trace.cache), removed when the session ends: a tiny model's
#: component is traced once, not once per export; tests of the cache itself point it elsewhere
_GRAPHS = tempfile.mkdtemp(prefix="sdport-graphs-")
os.environ.setdefault("SDPORT_GRAPH_CACHE", _GRAPHS)


#: folders of session-wide fixtures under pytest's base temp, which the clean-up after each module passes by
_SESSION_DIRS: set[str] = set()


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_GRAPHS, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _module_temp(request, tmp_path_factory) -> Iterator[None]:
    """The folders a test module made under pytest's base temp (its fixtures' models, pipelines, exports) removed
    when the module ends, unless one of its tests failed: the suite's temp stays the size of its largest module
    rather than the sum of them all. Torn down after the module's other fixtures (autouse ones come first)."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(os.listdir(base)), request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for name in set(os.listdir(base)) - before - _SESSION_DIRS:
        shutil.rmtree(base / name, ignore_errors=True)


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_cli(*args: str, timeout: float = 120, env: dict | None = None, **kw) -> Run:
    """Run ``python -m sdport ARGS`` and capture everything."""
    p = subprocess.run([sys.executable, "-m", "sdport", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, stdin=subprocess.DEVNULL, **kw)
    return Run(p.returncode, p.stdout, p.stderr)


def only(fixture: str, *families: str) -> pytest.MarkDecorator:
    """Run a test over just these families of a module's family-parametrised ``fixture`` (``setup``, ``fam``): the
    cases a test has no use for are never generated, rather than generated and skipped. Each family's fixture
    instance is still the one the module's other tests share."""
    return pytest.mark.parametrize(fixture, families, indirect=True)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def leftovers(folder: str | os.PathLike) -> list[str]:
    return [n for n in os.listdir(folder) if ".sdport-" in n]


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> str:
    """The demo SD1.x checkpoint written by sdport (torch zip, fp32, ``state_dict`` root)."""
    from sdport.demo import write_demo_checkpoint

    folder = tmp_path_factory.mktemp("demo")
    _SESSION_DIRS.add(folder.name)
    path = str(folder / "demo-sd1.ckpt")
    write_demo_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def demo_state_dict() -> dict:
    from sdport.demo import sd1_checkpoint

    return sd1_checkpoint()
