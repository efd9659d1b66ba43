"""Commit equivalence: running a workload under agentctl and committing leaves the host exactly
as running the workload directly would (type, permissions, content, symlink targets) — and every
host entry the commit replaced or deleted comes back byte-identical from the backup store."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from isolated_agent.backup.restore import events_for_path, restore
from tests.review.conftest import (
    State,
    Workspace,
    file_hash,
    link_groups,
    rmtree,
    tree_state,
)

WORKLOADS = {
    "edit_files": """
        echo more >> README.md
        sed -i 's/1/2/' src/pkg/mod.py
        : > docs/guide.txt
        echo new > src/new.py
        printf 'no newline' > src/main.py
    """,
    "delete_tree": """
        rm -rf src
        rm README.md
    """,
    "rename_dirs": """
        mv src source
        mv docs/guide.txt docs/manual.txt
        mkdir a && echo x > a/x && mv a b
        mv source/pkg pkg
    """,
    "dir_to_file_and_back": """
        rm -rf docs && echo file > docs
        rm -rf src/pkg && echo f > src/pkg
        rm src/pkg && mkdir src/pkg && echo again > src/pkg/new.py
        rm link && mkdir link && echo in > link/f
        rm README.md && mkdir README.md
    """,
    "symlinks": """
        ln -s main.py src/alias
        rm link && ln -s docs link
        ln -s /etc/hostname absolute
        ln -s dangling broken
        rm run.sh && ln -s README.md run.sh
        ln -s src/pkg pkglink
    """,
    "permissions": """
        chmod 600 README.md
        chmod 700 src
        chmod 755 docs/guide.txt
        chmod 644 run.sh
        chmod 750 src/pkg
        chmod 4755 src/main.py
    """,
    "binary_files": """
        printf '\\000\\001\\377' > blob.bin
        yes "$(printf '\\001\\002\\377\\000')" | head -c 100000 > src/random.bin
        printf '\\000' >> docs/guide.txt
        seq 1 2000 | gzip -n > README.md
    """,
    "non_utf8_names": """
        printf 'x' > "$(printf 'caf\\351')"
        mkdir "$(printf 'd\\377ir')"
        echo y > "$(printf 'd\\377ir')/$(printf '\\376')"
        mv docs/guide.txt "docs/$(printf 'g\\344')"
    """,
    "links_and_nodes": """
        ln README.md hard
        echo n > new && ln new new2
        mkfifo fifo
        mkdir -p empty/dir
    """,
    "kitchen_sink": """
        set -e
        echo created > new.txt
        mkdir -p newdir/deep && echo deep > newdir/deep/f
        echo appended >> README.md
        : > src/pkg/mod.py
        chmod 600 docs/guide.txt
        chmod 700 src
        rm src/main.py
        rm -r docs
        mv run.sh renamed.sh
        mv src/pkg src/pkg2
        mv newdir newdir2
        ln -s renamed.sh newlink
        rm link && ln -s new.txt link
        printf '\\000\\001\\002binary' > blob.bin
        rm -rf src && mkdir src && echo back > src/main.py
    """,
    "rewrites_that_change_nothing": """
        cat README.md > /tmp/copy && cat /tmp/copy > README.md
        touch docs/guide.txt
        chmod 600 run.sh && chmod 755 run.sh
        echo gone > tmpfile && rm tmpfile
    """,
}


def check_restorable(ws: Workspace, before: State, after: State, dest: Path) -> int:
    """Every host entry the commit replaced or deleted restores byte-identically."""
    backups = ws.backups()
    checked = 0
    try:
        for rel, (kind, perms, detail) in before.items():
            if after.get(rel) == (kind, perms, detail) or detail is None:
                continue  # unchanged, or a dir/fifo (no content to lose)
            original = os.fsencode(ws.project) + b"/" + rel
            target = Path(os.fsdecode(os.fsencode(dest) + b"/%d" % checked))
            target.mkdir(parents=True)
            events = [e for e in events_for_path(backups, original, None) if e.path == original]
            assert events, f"no backup of {rel!r}"
            [restored] = restore(backups, events, original, str(target), force=False)
            restored_path = restored.target
            if isinstance(detail, bytes):
                assert os.readlink(restored_path) == detail
            else:
                assert file_hash(restored_path) == detail
                assert os.lstat(restored_path).st_mode & 0o7777 == perms
            checked += 1
    finally:
        backups.close()
    return checked


def commit_and_compare(ws: Workspace, script: str, *commit_args: str) -> int:
    """Returns how many replaced or deleted host entries were restored and checked."""
    script = textwrap.dedent(script)
    before = tree_state(ws.project)
    reference = ws.direct(script)
    ws.run(script)
    assert tree_state(ws.project) == before, "the run wrote to the host"
    result = ws.ctl("commit", *commit_args)
    assert result.returncode == 0, result.stderr
    after = tree_state(ws.project)
    expected = tree_state(reference)
    assert after == expected
    assert link_groups(ws.project) == link_groups(reference)
    assert os.listdir(ws.upper()) == [], "committed changes must leave the env"
    assert ws.ctl("diff", "--name-status").stdout == ""
    return check_restorable(ws, before, after, ws.tmp / "restored")


# Workloads that replace or delete no host entry (they only add, or change nothing).
ONLY_ADDING = {"links_and_nodes", "rewrites_that_change_nothing"}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_run_then_commit_equals_running_directly(ws: Workspace, name: str) -> None:
    # Running directly keeps a setuid bit; commit clears it unless asked to keep it
    # (tests/security/test_commit_setuid.py).
    extra = ("--keep-setuid",) if name == "permissions" else ()
    restored = commit_and_compare(ws, WORKLOADS[name], *extra)
    assert (restored == 0) == (name in ONLY_ADDING)


def test_workloads_in_sequence_with_commits_between(ws: Workspace) -> None:
    """The env is reused: each commit starts from what the previous one left on the host."""
    for name in ("edit_files", "kitchen_sink", "dir_to_file_and_back"):
        commit_and_compare(ws, WORKLOADS[name])
        rmtree(ws.tmp / "direct")
        rmtree(ws.tmp / "restored")


@pytest.mark.slow
def test_a_file_of_a_few_hundred_megabytes(ws: Workspace) -> None:
    block = os.urandom(1 << 20)
    with open(ws.project / "big.bin", "wb") as f:
        for index in range(256):
            f.write(block[:-8] + index.to_bytes(8, "little"))
    script = """
        printf 'appended tail' >> big.bin
        head -c 3000000 /dev/zero > zeros.bin
    """
    assert commit_and_compare(ws, script) == 1
    assert os.path.getsize(ws.project / "big.bin") == (256 << 20) + len("appended tail")
