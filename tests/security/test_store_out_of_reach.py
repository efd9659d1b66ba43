"""A job cannot read the store: other envs' changes, the catalog, the backups of files that
commits replaced and guards saw deleted. The namespaced engines hide it in the job's view; the
filter and copy engines (no namespaces) leave it out of Landlock's read rules, however the job
names it — by its path, through a symlink of its own, or from /proc (its names stay listable
there, as /dev's do)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.security.conftest import Hostile

PROBE = r"""
import os, sys
store = sys.argv[1]
os.symlink(store, "store-link")
for name, path in (("catalog", os.path.join(store, "catalog.sqlite")),
                   ("listing", store),
                   ("symlink", "store-link/catalog.sqlite"),
                   ("proc", f"/proc/self/root{store}/catalog.sqlite"),
                   ("secret", os.path.join(store, "other-env-secret"))):
    try:
        if os.path.isdir(path) and name == "listing":
            print(name, "listed", len(os.listdir(path)))
        else:
            with open(path, "rb") as f:
                print(name, "read", len(f.read()))
    except OSError as e:
        print(name, "refused", e.errno)
os.unlink("store-link")
print("home", "read" if open(sys.argv[2]).read() == "mine\n" else "wrong")
"""


def test_a_job_cannot_read_the_store(hostile: Hostile) -> None:
    home_file = hostile.outside / "readable.txt"
    home_file.write_text("mine\n")
    hostile.give(home_file)
    hostile.outside.chmod(0o755)
    hostile.run("true")  # the store exists, with its catalog
    secret = hostile.store / "other-env-secret"
    secret.write_text("another env's change\n")
    secret.chmod(0o644)
    hostile.give(secret)
    os.chmod(hostile.store, 0o755)  # not even its mode stands in the way under test
    result = hostile.run("python3", "-c", PROBE, str(hostile.store), str(home_file))
    assert result.returncode == 0, result.stderr
    verdicts = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in ("catalog", "symlink", "proc", "secret"):
        assert not verdicts[name].startswith("read"), (name, result.stdout)
    # Listing its names stays possible without namespaces: Landlock's right to list the
    # directories on the way to the store holds beneath them too (as for /dev).
    if hostile.engine in ("kernel", "fuse"):
        assert verdicts["listing"] in ("listed 0", "refused 13"), result.stdout
    assert verdicts["home"] == "read"  # the rest of the host stays readable
    assert Path(hostile.store / "catalog.sqlite").exists()
