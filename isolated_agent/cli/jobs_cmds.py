"""`agentctl ps` and `agentctl exec`."""

from __future__ import annotations

import click

from isolated_agent.cli.output import emit_json, notice, table, when
from isolated_agent.env.store import Store
from isolated_agent.jobs import registry
from isolated_agent.jobs.run import exec_in_job


@click.command("ps")
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
def ps_cmd(as_json: bool) -> None:
    """List the jobs running in envs: env, engine, pid, command, start time."""
    jobs = registry.running(Store().run_dir)
    if as_json:
        emit_json([{"env": j.env_name, "env_id": j.env_id, "engine": j.engine, "pid": j.pid,
                    "launcher_pid": j.launcher_pid, "command": j.argv, "started": j.started,
                    "network": j.network} for j in jobs])
        return
    table(["env", "engine", "pid", "started", "command"],
          [(j.env_name, j.engine, str(j.pid), when(j.started), " ".join(j.argv)) for j in jobs])


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-q", "--quiet", is_flag=True, help="Say nothing on stderr unless something fails.")
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[ENV] -- CMD [ARGS]...")
def exec_cmd(quiet: bool, words: tuple[str, ...]) -> int:
    """Run CMD in the view of the job running in ENV (default: the env of the current
    directory, or the only running job), confined as that job is: its writes land in the env.

    Exit status: as `agentctl run`'s.
    """
    env_name, argv = _split(words)
    return exec_in_job(Store(), env_name, argv, notify=(lambda m: None) if quiet else notice)


def _split(words: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """ENV and CMD from what click leaves of `[ENV] -- CMD`: it drops the first `--` only when
    nothing precedes it. So a `--` after one word means that word is ENV (a command that has a
    `--` of its own therefore needs its ENV named: `agentctl exec ENV -- CMD -- ARG`)."""
    if len(words) >= 2 and words[1] == "--":
        return words[0], list(words[2:])
    return None, list(words)
