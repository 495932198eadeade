"""``weakseg`` command line: assembles the commands that the stage modules declare (``COMMAND`` or
``COMMANDS``, see ``weakseg.commands``) into one parser; nothing about a command is written here.

Snakemake rules call these commands with ``--config '<json>'`` (the config sections the command
declares); people call them by hand with ``--config config.yaml``. Only the module of the command
being run is imported, so that a command that needs no torch does not load it.

Exit status: 0 done, 2 usage error, 3 bad input or data (one line ``weakseg <command>: error: ...``
naming the file or key; ``-v`` adds the traceback), 1 a bug (traceback). A command that writes into
a run directory holds that run's lock while it runs (see ``weakseg.store.run_writer``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

from weakseg.allocator import reexecute_on_jemalloc
from weakseg.commands import Command
from weakseg.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("weakseg")

# The modules that declare commands, in the order of `weakseg --help`. None imports torch: a command's
# stage function is imported when it runs (see weakseg.commands).
COMMAND_MODULES = (
    "weakseg.datasets.synthetic",
    "weakseg.datasets.folder",
    "weakseg.superpixels",
    "weakseg.store",
    "weakseg.pseudo.clean",
    "weakseg.pseudo.crf",
    "weakseg.pseudo.rrm",
    "weakseg.pseudo.divergence",
    "weakseg.pseudo.consensus",
    "weakseg.evaluate",
    "weakseg.config",
    "weakseg.inspect.panels",
    "weakseg.inspect.report",
    "weakseg.cam",
    "weakseg.segment",
    "weakseg.joint",
    "weakseg.benchmark",
)


def _declared(module_name: str) -> tuple[Command, ...]:
    module = importlib.import_module(module_name)
    return tuple(getattr(module, "COMMANDS", ())) + ((module.COMMAND,) if hasattr(module, "COMMAND") else ())


def all_commands() -> list[Command]:
    return [command for name in COMMAND_MODULES for command in _declared(name)]


def _is_package(module_name: str) -> bool:
    return Path(__file__).parent.joinpath(*module_name.split(".")[1:], "__init__.py").is_file()


def find_command(name: str) -> Command | None:
    """The declaration of command ``name``. Packages declare their commands in a light ``__init__``
    (no torch, no stores) and are searched first; then the stage modules, each imported only until
    the command is found."""
    packages = [m for m in COMMAND_MODULES if _is_package(m)]
    for module_name in packages + [m for m in COMMAND_MODULES if m not in packages]:
        for command in _declared(module_name):
            if command.name == name:
                return command
    return None


DESCRIPTION = """\
weakseg: weakly supervised semantic segmentation from image-level labels.

You give photos with image labels ("cow;grass"); weakseg trains a classifier (SPN or CAM), turns
its class maps into pixel pseudo-labels (cleaning, dense CRF, reliable regions) and trains a
segmentation network on them in rounds. The whole pipeline is a Snakemake workflow:

  snakemake --cores 2                          the demo run (synthetic data, results/demo/)
  snakemake --cores 2 --configfile my.yaml     your dataset (results/my/, see README)

The commands below are the workflow's steps, each usable by hand, plus tools to look at a run and
to segment new images."""

EPILOG = """\
examples:
  weakseg inspect results/demo --worst 8 --stage crf    panels of the 8 worst CRF pseudo-labels
  weakseg report results/demo                           (re)write results/demo/report/index.html
  weakseg predict --model results/demo/round2/model.pt photos/ --out predictions/
  weakseg resolve-config --config my.yaml               every key of a config, defaults filled in
Run 'weakseg COMMAND --help' for a command's options."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends each option's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def build_parser(commands: list[Command] | None = None) -> argparse.ArgumentParser:
    """The ``weakseg`` parser with ``commands`` (default: every command)."""
    from weakseg import __version__

    parser = argparse.ArgumentParser(
        prog="weakseg", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands() if commands is None else commands:
        command.add_to(sub, HelpFormatter)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a known command builds only its own parser (the full one serves help and errors)."""
    name = next((a for a in argv if not a.startswith("-")), None)
    command = find_command(name) if name else None
    if command is not None and all(a in ("-v", "--verbose") for a in argv[: argv.index(name)]):
        return build_parser([command]).parse_args(argv)
    return build_parser().parse_args(argv)


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, FileNotFoundError, FileExistsError))


def _exit_on_sigterm(signum, frame):
    """SIGTERM (Slurm, Snakemake stopping jobs) unwinds like Ctrl-C: temporaries removed, lock released."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's entry point (not a call from Python): choose its allocator first
        reexecute_on_jemalloc()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    spec: Command = args.command_spec
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from weakseg import store

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        with store.run_writer(spec.written_paths(args), command=" ".join(["weakseg", *argv])):
            spec.invoke(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise  # a bug: keep the traceback (exit status 1)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"weakseg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
