"""What the command lines (train, render, evaluate, app) share: help that shows defaults and keeps
examples as written, usage errors on one line, the --device flag, and durations for people."""

import argparse

DEVICES = ("auto", "cuda", "cpu")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, unless it has none worth showing; the description and
    the examples kept line by line as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        unshown = action.default is None or action.default is False or action.default == []
        return action.help if unshown else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are the one line `PROG: error: MESSAGE` (exit 2): a
    full usage block would bury the message, and --help prints it anyway."""

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_device_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, **kwargs
) -> None:
    kwargs.setdefault("help", "where to run: auto picks CUDA when present, else the CPU")
    parser.add_argument("--device", choices=DEVICES, **kwargs)


def format_duration(seconds: float) -> str:
    """'12.5 min' under an hour, '1.92 h' from there on: how cards and the web UI state run times."""
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
