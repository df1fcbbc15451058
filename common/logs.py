"""Route the project's loggers through Flower's log handler.

Modules log with ``logging.getLogger(__name__)`` (``common.*``, ``client_app.*``, ``server_app.*``).
Those loggers have no handler of their own, so INFO lines would be dropped; Flower's ``flwr``
logger is what ``flwr run --stream``, SuperNode consoles and log files show, so we forward to its
handlers. Called once by each app entry point and the CLI.
"""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("common", "client_app", "server_app", "bench")


def setup_logging(level: int = logging.INFO) -> None:
    flwr_logger = logging.getLogger("flwr")
    handlers = list(flwr_logger.handlers)
    if not handlers:  # e.g. the CLI before Flower configured anything
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s | %(name)s | %(message)s", "%H:%M:%S"))
        handlers = [handler]
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be redirected later)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _error_logger() -> logging.Logger:
    logger = logging.getLogger("feda2v.errors")  # not a project logger: setup_logging leaves it alone
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("error: %(message)s"))
        logger.addHandler(handler)
    return logger


def report_error(message: object) -> None:
    """``error: <message>`` on stderr, once. It is an ERROR record of the ``feda2v.errors`` logger, which
    propagates, so whatever captures logging (a pytest ``caplog``, an embedding application) sees it too."""
    _error_logger().error("%s", message)
