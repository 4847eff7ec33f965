"""Log hygiene for Ray worker processes, installed through runtime_env's
`worker_process_setup_hook` (it runs in every worker before any task or actor).

Ray Train logs every `train.report` call at INFO ("Reporting training result …" and
"Checkpoint successfully created at …", one each per epoch) and, without a dashboard, its placement-group cleaner warns every
second that the state API is unavailable. Both bury the epoch lines users read.
"""
from __future__ import annotations

import importlib.util
import logging

# Ray Train names this module's logger after its *file*, so the name is a path.
_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
_CHECKPOINT_LOGGER = "ray.train.v2._internal.execution.storage"
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# where Ray Train logs a worker's error: the worker, the controller, its failure policy
_ERROR_LOGGERS = ("ray.train.v2._internal.util", "ray.train.v2._internal.execution.controller.controller",
                  "ray.train.v2._internal.execution.failure_handling.default")


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """False for Ray Train's tracebacks of a UserError (bad input, a diverged network): the
    driver prints its one line, and Ray Train does not retry it (trainer/driver.py)."""
    from shared.errors import UserError

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(getattr(error, "controller_failure", None), UserError) or isinstance(error, UserError):
        return False
    # the worker logs its traceback as text: the last line names the exception's class
    return not (record.getMessage().startswith("Error in training function")
                and record.getMessage().rstrip().splitlines()[-1].startswith("shared.errors."))


def quiet_workers() -> None:
    """Drop Ray Train's per-report INFO lines and its tracebacks of a UserError; other
    warnings and errors still show."""
    for name in _ERROR_LOGGERS:
        logging.getLogger(name).addFilter(_not_a_user_error)
    spec = importlib.util.find_spec(_REPORT_LOGGER_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    # a filter, not a level: Ray Train's dictConfig of "ray.train" resets its children's
    # levels when the worker starts training (after this hook), and leaves their filters
    logging.getLogger(_CHECKPOINT_LOGGER).addFilter(lambda record: record.levelno >= logging.WARNING)


def quiet_local_workers() -> None:
    """`quiet_workers`, and silence the placement-group cleaner: a local Ray has no
    dashboard, so the cleaner's state-API queries all fail (shared.ray_session.connect
    makes sure of it), and its placement groups die with the driver's Ray anyway."""
    quiet_workers()
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
