"""The errors a user can meet, each with its exit code.

The library raises these; the CLI turns them into one line on stderr and the exit code, in one
place (`isolated_agent.cli.main`). Anything else that escapes is a bug and is reported as such.

    AgentctlError                 exit 1   something the user asked for cannot be done
    ├── UsageError                exit 2   the request itself is malformed (bad path, bad name)
    ├── EnvNotFound               exit 1
    ├── EnvBusy                   exit 1   another run holds the env
    ├── StoreError                exit 1   the store is missing, unwritable or damaged
    ├── RootMissing               exit 1   a managed root is gone from the host
    ├── CommitConflict            exit 1   the host changed paths the env changed; nothing applied
    ├── CommitIncomplete          exit 1   some changes could not be applied; they stay in the env
    ├── BackupError               exit 1   the backup store cannot take or give back a backup
    │   └── BlobCorrupt           exit 1   a backed-up blob no longer matches its sha256
    ├── BackupNotFound            exit 1   no backup with that id, or of that path
    ├── GuardError                exit 1   a directory cannot be guarded, or unguarded
    └── IsolationError            exit 125 a step that isolates the job failed; CMD was not run
    CommandNotFound               exit 127 (like a shell)
    CommandNotExecutable          exit 126 (like a shell)
"""

from __future__ import annotations


class AgentctlError(Exception):
    """An error the user can act on. `str(err)` is the whole message: what happened, what to do."""

    exit_code = 1


class UsageError(AgentctlError):
    exit_code = 2


class EnvNotFound(AgentctlError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no env named {name!r}; `agentctl env list` shows the envs there are")


class EnvBusy(AgentctlError):
    pass


class StoreError(AgentctlError):
    pass


class IsolationError(AgentctlError):
    """An isolation step failed, so the command was not started (exit 125, as docker/podman do)."""

    exit_code = 125

    def __init__(self, step: str, detail: str, hint: str = "") -> None:
        self.step = step
        self.detail = detail
        self.hint = hint
        message = f"isolation failed at {step}: {detail}"
        if hint:
            message += f"; {hint}"
        super().__init__(message + " (the command was not run)")


class CommandNotFound(AgentctlError):
    exit_code = 127


class CommandNotExecutable(AgentctlError):
    exit_code = 126


class RootMissing(AgentctlError):
    def __init__(self, env_name: str, root: str) -> None:
        super().__init__(
            f"the managed root {root} of env {env_name} no longer exists on the host; "
            f"recreate the directory, or drop the env with `agentctl env rm {env_name}`"
        )


class CommitConflict(AgentctlError):
    """The host changed, after the env saw them, paths that the env changed too."""

    def __init__(self, message: str, conflicts: list[str]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


class CommitIncomplete(AgentctlError):
    """Some changes could not be applied to the host; each is listed in `problems`."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class BackupError(AgentctlError):
    pass


class BlobCorrupt(BackupError):
    pass


class BackupNotFound(AgentctlError):
    pass


class GuardError(AgentctlError):
    pass


def store_full(what: str, where: str, detail: str) -> str:
    """The one message for a store whose filesystem is full: which, and what the user can do."""
    return (f"{what} at {where} is full ({detail}); free some space there, or point "
            "ISOLATED_AGENT_HOME at a store on a filesystem with room")
