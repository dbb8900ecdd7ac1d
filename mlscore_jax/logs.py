"""Where log records go: everything into a file of the workdir, only our own to the console.

`setup(log_file)` is called by the command-line entry points (`main`, the demo). It

* writes every record (this package, absl, orbax, JAX, TensorFlow; Python warnings too) with
  its traceback to `log_file`;
* shows on the console this package's records (INFO and up; its DEBUG records, such as the
  per-step and per-batch lines behind the progress bars, go to the file only) and other
  libraries' errors only,
  without tracebacks unless `verbose`: third-party warnings (orbax's "Given directory is read
  only" on every read-only restore, for example) are kept in the file, not on the screen.

`user_errors(log_file, verbose)` is how the command-line programs (`main`, `convert`, `nll`)
end on a mistake of the user (a bad config key, a missing checkpoint, a file that does not fit):
one line on the console, the traceback in the log file, exit status 2.

Library code only calls `logging.getLogger(__name__)`; it never configures handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

_OURS = ("mlscore_jax", "__main__", "experiments")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in _OURS
        return record.levelno >= (logging.INFO if ours else logging.ERROR)


class _ConsoleHandler(logging.StreamHandler):
    """Writes above any tqdm progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


class _ShortFormatter(logging.Formatter):
    """The message only: no traceback (the file has it)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return prefix + record.getMessage()


def setup(log_file: str | None, *, verbose: bool = False) -> None:
    """Route log records: all of them to `log_file` (appended), ours to the console."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("mlscore_jax").setLevel(logging.DEBUG)  # the file gets our DEBUG lines
    for handler in list(root.handlers):  # absl's stderr handler, earlier setups
        root.removeHandler(handler)
    try:  # absl would otherwise re-install its own handler and print everything to stderr
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)
        absl_logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    except ImportError:  # pragma: no cover
        pass
    console = _ConsoleHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter(_FORMAT) if verbose else _ShortFormatter())
    root.addHandler(console)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file_handler)
    logging.captureWarnings(True)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean the input is wrong, not the program."""
    from mlscore_jax import checkpoint, datasets, experiment

    return (
        experiment.ConfigError,
        datasets.DatasetNotPreparedError,
        checkpoint.CheckpointError,
        FileNotFoundError,
        FloatingPointError,  # train.NonFiniteError: the run diverged
        ValueError,  # convert.ConversionError, bad images for nll, bad settings
    )


@contextlib.contextmanager
def user_errors(log_file: str, *, verbose: bool = False) -> Iterator[None]:
    """Inside it, a user error (`user_error_types`) is logged (traceback to the file only) and
    ends the program with exit status 2; with `verbose` it propagates with its traceback."""
    try:
        yield
    except user_error_types() as e:
        if verbose:
            raise
        logging.getLogger("mlscore_jax").error("%s", e, exc_info=True)
        print(f"(traceback in {log_file}; --verbose shows it here)", file=sys.stderr)
        sys.exit(2)
