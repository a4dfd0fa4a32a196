"""One exception hierarchy for everything griffin reports to a user.

Every message names what went wrong, the offending value, and the fix. The CLI maps these to
one red line and an exit code in a single place (``griffin_cli.main``); the library never
prints.
"""

from __future__ import annotations


class GriffinError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(GriffinError):
    """A bad option value, input file, or argument to a library function: what the caller
    passes must change (exit code 2)."""

    exit_code = 2


class ModelLoadError(GriffinError):
    """The model (or original) could not be found, read or loaded."""


class UnsupportedArchitectureError(GriffinError):
    """The model's ``model_type`` is not in the architecture table."""


class ExportFormatError(GriffinError):
    """An export directory is missing files, inconsistent, or was modified."""


class OutputError(GriffinError):
    """The output location cannot be written (exists, inside the source, disk full...)."""


class VerificationError(ExportFormatError):
    """An export directory failed verification; ``problems`` lists every finding."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class OriginalMismatchError(GriffinError):
    """The original model given is not the one the export was made from."""


class ConverterError(GriffinError):
    """An external converter griffin runs (llama.cpp's ``convert-hf-to-gguf``) failed or ran
    out of time; ``output`` holds its last lines of output (also in the message)."""

    def __init__(self, message: str, output: list[str]) -> None:
        super().__init__(message)
        self.output = output


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's
    name when the message is empty: what a one-line error quotes from a lower-level one."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
