"""The ``sdport`` command: the group every verb's module (``inspect``, ``convert``, ``verify``, ``lora``, …) adds
to, and ``main``, which turns errors into one line and an exit status.

Exit status: 0 success, 2 bad input or refused output, 3 a parity failure (``verify``, ``convert --verify``),
1 internal error, 130 Ctrl-C, 143 SIGTERM.
The verbs' modules only parse options and print; the work is the public API's.
"""

from __future__ import annotations

import os
import signal
import sys

import click


class _Terminated(BaseException):
    """SIGTERM, raised so that every ``finally`` (temp file removal) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


#: options of the whole command, taken wherever they stand (``sdport convert … --debug`` too)
GLOBAL_FLAGS = ("--debug", "--offline")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdport")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--offline", is_flag=True, help="Resolve sources from the caches only (also SDPORT_OFFLINE=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, offline: bool) -> None:
    """Inspect and convert Stable Diffusion weights between every format, streaming and offline."""
    ctx.obj = {"debug": debug}
    if offline:
        os.environ["SDPORT_OFFLINE"] = "1"


from . import batch, cache, convert, demo, doctor, inspect, lora, verify  # noqa: E402,F401 - each verb adds itself to the group


def _global_first(argv: list[str]) -> list[str]:
    """``argv`` with the global flags moved before the verb, so they may be given anywhere (not after ``--``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from ..errors import SdportError

    argv = _global_first(list(argv if argv is not None else sys.argv[1:]))
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = cli.main(args=argv, prog_name="sdport", standalone_mode=False)
    except SdportError as exc:
        if debug:
            raise
        click.echo(f"sdport: error: {exc.message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("sdport: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sdport: interrupted", err=True)
        return 130
    except _Terminated:
        click.echo("sdport: terminated", err=True)
        return 143
    except Exception as exc:  # noqa: BLE001 - the one place that reports bugs
        if debug:
            raise
        click.echo(f"sdport: error: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                   "and report it)", err=True)
        return 1
    return status if isinstance(status, int) else 0  # a verb's own status: verify's 3 for a parity failure
