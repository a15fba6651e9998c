"""Logging for stage scripts: one log file per Snakemake job, progress bars included."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def job_log(path: str | Path | None) -> Iterator[logging.Logger]:
    """Send this process's stdout, stderr (tqdm bars too) and ``logging`` to ``path``.

    Snakemake's ``log:`` file is the one place a failed job's traceback ends up, so the
    traceback is written there before the exception propagates.
    """
    logger = logging.getLogger("mofo")
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield logger
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as fh:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield logger
        except BaseException:
            logger.exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stdout, sys.stderr = old_out, old_err
