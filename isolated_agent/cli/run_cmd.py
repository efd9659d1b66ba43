"""`agentctl run`."""

from __future__ import annotations

import click

from isolated_agent.cli.output import ProgressBar, notice
from isolated_agent.engines import ENGINE_NAMES
from isolated_agent.env.store import Store
from isolated_agent.jobs.run import RunRequest, run
from isolated_agent.system.cgroup import Limits
from isolated_agent.system.sizes import parse_size


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--env", "env_name", metavar="NAME",
              help="The env to run in; created when it does not exist. "
                   "Default: the env of these roots, or a new one.")
@click.option("--root", "roots", multiple=True, metavar="DIR",
              help="A managed root (repeatable). Default: the current directory.")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="auto", show_default=True,
              help="How the env's view is made (copy: in a clone of the project, not at its "
                   "real path; for machines with neither namespaces nor FUSE).")
@click.option("--allow", multiple=True, metavar="PATH",
              help="Let the job write to PATH on the host (repeatable).")
@click.option("--no-default-allows", is_flag=True,
              help="Do not let the job write to the agent state and cache dirs it may by default.")
@click.option("--allow-socket", "allow_sockets", multiple=True, metavar="PATH",
              help="Let the job connect to the host's unix socket PATH (repeatable); "
                   "the host's other daemon sockets are out of its reach.")
@click.option("--network", type=click.Choice(["host", "none"]), default="host",
              show_default=True,
              help="none: the job gets a network of its own with only loopback.")
@click.option("--keep-running", is_flag=True,
              help="When CMD exits, wait for the processes it left running; "
                   "default: kill them.")
@click.option("--memory", metavar="SIZE",
              help="Limit the job's memory (e.g. 4G; no swap beyond it). Needs cgroup v2's "
                   "memory controller: refused, never ignored, where it is missing.")
@click.option("--pids", type=click.IntRange(min=1), metavar="N",
              help="Limit the job to N processes and threads (cgroup v2's pids controller).")
@click.option("--cpus", type=click.FloatRange(min=0.01), metavar="N",
              help="Limit the job to N CPUs' worth of time, e.g. 1.5 (cgroup v2's cpu "
                   "controller).")
@click.option("-q", "--quiet", is_flag=True, help="Say nothing on stderr unless something fails.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def run_cmd(
    env_name: str | None,
    roots: tuple[str, ...],
    engine: str,
    allow: tuple[str, ...],
    no_default_allows: bool,
    allow_sockets: tuple[str, ...],
    network: str,
    keep_running: bool,
    memory: str | None,
    pids: int | None,
    cpus: float | None,
    quiet: bool,
    argv: tuple[str, ...],
) -> int:
    """Run CMD in an env: it sees the project at its real path; its writes stay in the env.

    Exit status: CMD's own (128+N if it died of signal N); 125 if isolation failed and CMD was
    not run; 126/127 if CMD could not be executed or was not found.
    """
    try:
        memory_bytes = None if memory is None else parse_size(memory)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--memory") from None
    request = RunRequest(
        argv=list(argv),
        env_name=env_name,
        roots=roots,
        engine=engine,
        allow=allow,
        default_allows=not no_default_allows,
        keep_running=keep_running,
        network=network,
        allow_sockets=allow_sockets,
        limits=Limits(memory=memory_bytes, pids=pids, cpus=cpus),
    )
    return run(Store(), request, notify=(lambda message: None) if quiet else notice,
               progress=ProgressBar.when_wanted(quiet))
