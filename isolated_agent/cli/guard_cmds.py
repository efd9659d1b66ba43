"""`agentctl guard start|stop|status` and `agentctl backupd`: backup on delete."""

from __future__ import annotations

import click

from isolated_agent.env.store import Store


@click.command("backupd")
@click.option("--once", is_flag=True,
              help="Upload everything due now, then exit (instead of serving).")
@click.option("--rescan", "rescan", type=float, default=30.0, show_default=True,
              metavar="SECONDS", help="How often to look at the catalog without being woken.")
@click.option("--backoff-base", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="First retry delay; it doubles with each failed attempt.")
@click.option("--backoff-cap", type=float, default=600.0, show_default=True, metavar="SECONDS",
              help="Longest retry delay.")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
def backupd_cmd(once: bool, rescan: float, backoff_base: float, backoff_cap: float,
                verbose: bool) -> None:
    """The backup daemon: upload staged items, verify them, purge the staged copies.

    Runs in the foreground (systemd: packaging/systemd/agentctl-backupd.service); logs to
    stderr. `agentctl guard start` starts one on demand when none runs.
    """
    from isolated_agent.backup.daemon import Daemon, Settings, setup_logging

    setup_logging(verbose)
    settings = Settings(rescan_interval=max(rescan, 0.05), backoff_base=max(backoff_base, 0.01),
                        backoff_cap=max(backoff_cap, 0.01))
    Daemon(Store().home, settings).run(once=once)
