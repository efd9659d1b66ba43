"""The filter engine: agentfs mounted in place over a managed root, a view per process
(DESIGN §4.2, §6, §8; the seed's minifilter model).

    fs.py        the file system: views, per-name inode numbers and cache lifetimes
    identity.py  which process belongs to which job (cgroup, else the launcher's anchor)
    daemon.py    one daemon per root: mount, control port, idle stop (`python -m` runs it)
    records.py   where daemons are found (one record per root in the store)
    control.py   the CLI's and the launcher's side: find, start, stop, register
    engine.py    the `filter` engine of `agentctl run`

How a job without namespaces is confined: `isolated_agent.jobs.confine` and the launcher's
namespace-less mode.
"""
