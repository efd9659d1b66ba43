"""The errors a user can meet, each with its exit code.

The library raises these; the CLI turns them into one line on stderr and the exit code, in one
place (`isolated_agent.cli.main`). Anything else that escapes is a bug and is reported as such.

    AgentctlError                 exit 1   something the user asked for cannot be done
    ├── UsageError                exit 2   the request itself is malformed (bad path, bad name)
    ├── EnvNotFound               exit 1
    ├── EnvBusy                   exit 1   another run holds the env
    ├── StoreError                exit 1   the store is missing, unwritable or damaged
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
