"""Entry point of `agentctl`: the command group and the one place errors become exit codes.

Exit codes: 0 success; 1 an error the user can act on; 2 bad usage; 125 isolation failed and the
command was not run; 126/127 the command could not be executed / was not found (as a shell);
otherwise the job's own status, 128+N when it died of signal N; 70 an internal error (a bug).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from isolated_agent import __version__
from isolated_agent.errors import AgentctlError, UsageError

EXIT_INTERNAL_ERROR = 70

# Each command's module is imported only when the command runs: `agentctl run` must not pay for
# the diff, backup and FUSE machinery at every start (DESIGN: run -- true in under 150 ms).
COMMANDS = {
    "run": "isolated_agent.cli.run_cmd:run_cmd",
    "env": "isolated_agent.cli.env_cmds:env_group",
    "discard": "isolated_agent.cli.env_cmds:discard_cmd",
    "checkpoint": "isolated_agent.cli.stack_cmds:checkpoint_cmd",
    "log": "isolated_agent.cli.stack_cmds:log_cmd",
    "rollback": "isolated_agent.cli.stack_cmds:rollback_cmd",
    "fork": "isolated_agent.cli.stack_cmds:fork_cmd",
    "gc": "isolated_agent.cli.stack_cmds:gc_cmd",
    "squash": "isolated_agent.cli.stack_cmds:squash_cmd",
    "diff": "isolated_agent.cli.review_cmds:diff_cmd",
    "commit": "isolated_agent.cli.review_cmds:commit_cmd",
    "backup": "isolated_agent.cli.backup_cmds:backup_group",
    "mount": "isolated_agent.cli.mount_cmds:mount_cmd",
    "umount": "isolated_agent.cli.mount_cmds:umount_cmd",
    "guard": "isolated_agent.cli.guard_cmds:guard_group",
    "backupd": "isolated_agent.cli.guard_cmds:backupd_cmd",
    "filter": "isolated_agent.cli.filter_cmds:filter_group",
    "doctor": "isolated_agent.cli.doctor_cmd:doctor_cmd",
    "config": "isolated_agent.cli.config_cmds:config_group",
    "ps": "isolated_agent.cli.jobs_cmds:ps_cmd",
    "exec": "isolated_agent.cli.jobs_cmds:exec_cmd",
}
# The commands whose options the user's config file gives defaults to (cli/settings.py).
CONFIGURED = ("run", "guard")


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentctl")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run programs against your project in a private copy-on-write env; review and keep or
    drop what they changed."""
    from isolated_agent.env.journal import pending_env_ids
    from isolated_agent.env.store import default_home

    if ctx.invoked_subcommand in CONFIGURED:
        from isolated_agent.cli import settings

        ctx.default_map = settings.load().default_map()

    # A commit killed half-way is finished at the first chance; commit does it itself.
    if ctx.invoked_subcommand != "commit" and pending_env_ids(default_home()):
        from isolated_agent.cli.review_cmds import finish_interrupted_commits

        finish_interrupted_commits()


def main(argv: list[str] | None = None) -> None:
    sys.exit(invoke(argv))


def _lost_working_directory(error: Exception) -> str | None:
    """The user-facing message when `error` came from a current directory that is gone
    (removed, or on a filter mount whose daemon stopped), else None."""
    if not isinstance(error, OSError):
        return None
    try:
        os.getcwd()
    except OSError as e:
        return (f"your current directory is not reachable ({os.strerror(e.errno or 0)}): it "
                "was removed, or a filter mount over it stopped; cd to it again (cd \"$PWD\")")
    return None


def invoke(argv: list[str] | None = None) -> int:
    """Run one agentctl command and return its exit code; never raises, never a traceback
    (unless AGENTCTL_DEBUG=1)."""
    try:
        result = cli.main(args=argv, prog_name="agentctl", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("agentctl: aborted", err=True)
        return 130
    except AgentctlError as e:
        click.echo(f"agentctl: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("agentctl: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as e:  # a bug: say so in one line
        lost = _lost_working_directory(e)
        if lost is not None:
            click.echo(f"agentctl: {lost}", err=True)
            return UsageError.exit_code
        if os.environ.get("AGENTCTL_DEBUG"):
            raise
        click.echo(
            f"agentctl: internal error: {e!r} (a bug; AGENTCTL_DEBUG=1 shows where)", err=True
        )
        return EXIT_INTERNAL_ERROR
    return result if isinstance(result, int) else 0
