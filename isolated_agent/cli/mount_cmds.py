"""`agentctl mount` and `agentctl umount`: an env's merged view at a mount point (agentfs)."""

from __future__ import annotations

from dataclasses import asdict

import click

from isolated_agent.cli.output import emit_json, notice
from isolated_agent.env.store import Store

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.command("mount")
@click.argument("env_name", metavar="ENV")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--root", metavar="DIR",
              help="Which managed root to show (when the env has several).")
@click.option("--foreground", is_flag=True, help="Serve in this process until unmounted or Ctrl-C.")
@json_option
def mount_cmd(
    env_name: str, mountpoint: str, root: str | None, foreground: bool, as_json: bool
) -> None:
    """Mount ENV's merged view of its project at MOUNTPOINT (agentfs, FUSE).

    Reads show the project with the env's changes; writes go to the env. The env is locked
    while mounted: `agentctl umount MOUNTPOINT` frees it.
    """
    from isolated_agent.engines.fuse.envmount import MountRecord, mount_env

    store = Store()
    env = store.get(env_name)

    def mounted(record: MountRecord) -> None:
        if as_json:
            emit_json(asdict(record))
        else:
            notice(f"env {record.env} ({record.root}) mounted at {record.mountpoint}"
                   + ("; Ctrl-C unmounts" if foreground else
                      f"; `agentctl umount {record.mountpoint}` unmounts"))

    mount_env(store, env, mountpoint, root=root, foreground=foreground, on_mounted=mounted)


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@json_option
def umount_cmd(mountpoint: str, as_json: bool) -> None:
    """Unmount an agentfs mount, even one whose daemon died, and wait for its daemon."""
    from isolated_agent.engines.fuse.envmount import unmount_env

    record = unmount_env(Store(), mountpoint)
    if as_json:
        emit_json({"unmounted": mountpoint, **({"env": record.env} if record else {})})
    else:
        notice(f"unmounted {mountpoint}")

