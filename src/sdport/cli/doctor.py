"""``sdport doctor``: what this installation runs with — the cast kernels, the optional extras, the caches."""

from __future__ import annotations

import importlib.util
import platform
from importlib.metadata import PackageNotFoundError, version

import click

from . import cli

#: the optional packages behind sdport's extras, and what each enables
EXTRAS = (("torch", "ONNX export, verify --outputs"), ("onnx", "ONNX export"), ("onnxruntime", "verify of ONNX"),
          ("diffusers", "ONNX export, verify --outputs"), ("transformers", "ONNX export, verify --outputs"),
          ("jsonschema", "sdport batch"), ("yaml", "YAML manifests"), ("ray", "batch --executor ray"))


def _version(module: str) -> str:
    try:
        return version({"yaml": "pyyaml"}.get(module, module))
    except PackageNotFoundError:
        return "installed"


@cli.command("doctor")
def doctor() -> None:
    """Which cast kernels run here, which extras are installed, where the caches are."""
    from ..dtypes import _casts, fast_casts
    from ..sources.cache import root
    from ..trace.cache import graph_dir

    click.echo(f"sdport {version('sdport')}, Python {platform.python_version()}, numpy {version('numpy')}, "
               f"{platform.machine()}")
    if fast_casts():
        click.echo(f"casts: compiled ({fast_casts()})")
    elif _casts is None:
        click.echo("casts: numpy (slower: sdport._casts was not built at install; reinstall with a C compiler)")
    else:
        click.echo("casts: numpy (slower: SDPORT_NO_FASTCAST is set, or this CPU lacks F16C/AVX2)")
    for module, use in EXTRAS:
        have = importlib.util.find_spec(module) is not None
        click.echo(f"{module}: {_version(module) if have else 'not installed'}  ({use})")
    click.echo(f"download cache: {root()}")
    click.echo(f"traced ONNX graphs: {graph_dir()}")
