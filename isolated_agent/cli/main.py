"""Entry point of `agentctl`: the command group and the one place errors become exit codes.

Exit codes: 0 success; 1 an error the user can act on; 2 bad usage; 125 isolation failed and the
command was not run; 126/127 the command could not be executed / was not found (as a shell);
otherwise the job's own status, 128+N when it died of signal N; 70 an internal error (a bug).
"""

from __future__ import annotations

import os
import sys

import click

from isolated_agent import __version__
from isolated_agent.cli.backup_cmds import backup_group
from isolated_agent.cli.env_cmds import discard_cmd, env_group
from isolated_agent.cli.guard_cmds import backupd_cmd, guard_group
from isolated_agent.cli.mount_cmds import mount_cmd, umount_cmd
from isolated_agent.cli.review_cmds import commit_cmd, diff_cmd, finish_interrupted_commits
from isolated_agent.cli.run_cmd import run_cmd
from isolated_agent.errors import AgentctlError

EXIT_INTERNAL_ERROR = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentctl")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run programs against your project in a private copy-on-write env; review and keep or
    drop what they changed."""
    if ctx.invoked_subcommand != "commit":  # commit finishes them itself, with its own report
        finish_interrupted_commits()


cli.add_command(env_group)
cli.add_command(run_cmd)
cli.add_command(discard_cmd)
cli.add_command(diff_cmd)
cli.add_command(commit_cmd)
cli.add_command(backup_group)
cli.add_command(mount_cmd)
cli.add_command(umount_cmd)
cli.add_command(backupd_cmd)
cli.add_command(guard_group)


def main(argv: list[str] | None = None) -> None:
    sys.exit(invoke(argv))


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
        if os.environ.get("AGENTCTL_DEBUG"):
            raise
        click.echo(
            f"agentctl: internal error: {e!r} (a bug; AGENTCTL_DEBUG=1 shows where)", err=True
        )
        return EXIT_INTERNAL_ERROR
    return result if isinstance(result, int) else 0
