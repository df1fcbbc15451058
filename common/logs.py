"""Route the project's loggers through Flower's log handler.

Modules log with ``logging.getLogger(__name__)`` (``common.*``, ``client_app.*``, ``server_app.*``).
Those loggers have no handler of their own, so INFO lines would be dropped; Flower's ``flwr``
logger is what ``flwr run --stream``, SuperNode consoles and log files show, so we forward to its
handlers. Called once by each app entry point and the CLI.
"""

from __future__ import annotations

import logging

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
