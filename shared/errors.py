"""The exception types that the command lines turn into a one-line error, and `user_cause`,
which finds the user's error inside the wrappers Ray puts around it."""


class UserError(Exception):
    """Bad input from the user: a file or an option. The message names it."""


class CorruptShardError(UserError):
    """A shard that exists but cannot be read, or does not follow the contract."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: corrupt or unreadable shard ({why})")
        self.path, self.why = path, why

    def __reduce__(self):  # picklable across processes and Ray workers
        return CorruptShardError, (self.path, self.why)


class ForeignShardError(CorruptShardError):
    """A shard that another run wrote (SPEC §6): ignored, never deleted."""

    def __init__(self, path: str, owner: str, run_id: str):
        UserError.__init__(self, f"{path}: written by run {owner or '(none)'}, not by this run {run_id}")
        self.path, self.owner, self.run_id = path, owner, run_id
        self.why = f"run {owner}"

    def __reduce__(self):
        return ForeignShardError, (self.path, self.owner, self.run_id)


def user_cause(e: BaseException):
    """A UserError raised inside a Ray worker arrives wrapped: find it (Ray Train holds
    it in a ControllerError's controller_failure or a WorkerGroupError's worker_failures)."""
    seen = set()
    todo = [e]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None
