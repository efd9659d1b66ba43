"""`agentctl diff` and the changeset under it: what counts as a change, in which order, and how
it is shown (patch, --stat, --name-status, --json), for the env of the current directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from isolated_agent.env.changeset import read_changeset
from isolated_agent.env.selection import Selection
from isolated_agent.env.store import Store
from tests.review.conftest import Workspace

PATCH_WORKLOAD = """
    printf '# demo\\nmore\\n' > README.md
    chmod 600 run.sh
    rm docs/guide.txt
    rm link && ln -s src/main.py link
    printf 'a\\nb' > new.txt
    printf '\\000\\001' > bin.dat
"""

EXPECTED_PATCH = textwrap.dedent("""\
    diff --git a/README.md b/README.md
    --- a/README.md
    +++ b/README.md
    @@ -1 +1,2 @@
     # demo
    +more
    diff --git a/bin.dat b/bin.dat
    new file mode 100644
    Binary files /dev/null and b/bin.dat differ
    diff --git a/docs/guide.txt b/docs/guide.txt
    deleted file mode 100644
    --- a/docs/guide.txt
    +++ /dev/null
    @@ -1 +0,0 @@
    -guide
    diff --git a/link b/link
    --- a/link
    +++ b/link
    @@ -1 +1 @@
    -README.md
    \\ No newline at end of file
    +src/main.py
    \\ No newline at end of file
    diff --git a/new.txt b/new.txt
    new file mode 100644
    --- /dev/null
    +++ b/new.txt
    @@ -0,0 +1,2 @@
    +a
    +b
    \\ No newline at end of file
    diff --git a/run.sh b/run.sh
    old mode 100755
    new mode 100600
""")


def test_patch_is_a_unified_diff_like_git(ws: Workspace) -> None:
    ws.run(textwrap.dedent(PATCH_WORKLOAD))
    result = ws.ctl("diff")
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED_PATCH
    colored = ws.ctl("diff", "--color", "always", "README.md").stdout
    assert "\x1b[32m+more\x1b[m" in colored and "\x1b[36m@@ -1 +1,2 @@\x1b[m" in colored


def test_stat_name_status_and_json(ws: Workspace) -> None:
    ws.run(textwrap.dedent(PATCH_WORKLOAD))
    assert ws.ctl("diff", "--name-status").stdout.splitlines() == [
        "M\tREADME.md", "A\tbin.dat", "D\tdocs/guide.txt", "M\tlink", "A\tnew.txt", "M\trun.sh",
    ]
    assert ws.ctl("diff", "--stat").stdout.splitlines() == [
        " README.md      | 1 +",
        " bin.dat        | Bin 0 -> 2 bytes",
        " docs/guide.txt | 1 -",
        " link           | 2 +-",
        " new.txt        | 2 ++",
        " run.sh         | 0",
        " 6 files changed, 4 insertions(+), 2 deletions(-)",
    ]
    changes = json.loads(ws.ctl("diff", "--json").stdout)["changes"]
    by_path = {c["path"]: c for c in changes}
    assert by_path["run.sh"]["mode_changed"] and not by_path["run.sh"]["content_changed"]
    assert by_path["run.sh"]["old"]["mode"] == "100755"
    assert by_path["run.sh"]["new"]["mode"] == "100600"
    assert by_path["link"]["old"]["target"] == "README.md"
    assert by_path["link"]["new"]["target"] == "src/main.py"
    assert by_path["bin.dat"]["binary"] and by_path["bin.dat"]["status"] == "A"
    assert by_path["README.md"]["insertions"] == 1
    assert by_path["docs/guide.txt"]["new"] is None


def test_what_is_and_is_not_a_change(ws: Workspace) -> None:
    ws.run(textwrap.dedent("""\
        touch README.md
        cat src/main.py > /tmp/x && cat /tmp/x > src/main.py
        chmod 600 run.sh && chmod 755 run.sh
        echo tmp > scratch && rm scratch
        rm -rf src/pkg && mkdir src/pkg && cp /tmp/x src/pkg/other.py
        rm -rf docs && echo now-a-file > docs
        rm link && mkdir link
    """))
    assert ws.ctl("diff", "--name-status").stdout.splitlines() == [
        "T\tdocs",
        "D\tdocs/guide.txt",
        "T\tlink/",
        "D\tsrc/pkg/__init__.py",
        "D\tsrc/pkg/mod.py",
        "A\tsrc/pkg/other.py",
    ]


def test_order_is_by_path_bytes_and_names_need_not_be_utf8(ws: Workspace) -> None:
    ws.run("echo 1 > b; echo 2 > a.txt; mkdir a; echo 3 > a/z; "
           "printf x > \"$(printf 'caf\\351')\"")
    raw = subprocess.run(
        [sys.executable, "-m", "isolated_agent", "diff", "--name-status"], cwd=ws.project,
        env=dict(os.environ, ISOLATED_AGENT_HOME=str(ws.store_home)), capture_output=True,
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.splitlines() == [
        b"A\ta/", b"A\ta.txt", b"A\ta/z", b"A\tb", b"A\tcaf\xe9",
    ]
    store = Store(str(ws.store_home))
    changeset = read_changeset(store.get("e1"))
    assert [c.rel for c in changeset.changes] == [b"a", b"a.txt", b"a/z", b"b", b"caf\xe9"]


def test_paths_select_subtrees_and_the_env_comes_from_the_directory(ws: Workspace) -> None:
    ws.run("echo x >> src/main.py; echo y >> README.md; echo z > src/pkg/new.py")
    inside = ws.agentctl("diff", "--name-status", ".", cwd=ws.project / "src")
    assert inside.stdout.splitlines() == ["M\tsrc/main.py", "A\tsrc/pkg/new.py"]
    by_name = ws.ctl("diff", "e1", "--name-status", "src/pkg")
    assert by_name.stdout.splitlines() == ["A\tsrc/pkg/new.py"]
    absolute = ws.agentctl("diff", "--env", "e1", "--name-status",
                           str(ws.project / "README.md"), cwd="/")
    assert absolute.stdout.splitlines() == ["M\tREADME.md"]
    typo = ws.ctl("diff", "src/nosuch.py")
    assert typo.returncode == 2 and "no such path in env e1 or on the host" in typo.stderr
    ws.ctl("env", "create", "e2", "--root", str(ws.project))
    several = ws.ctl("diff")
    assert several.returncode == 2 and "several envs manage" in several.stderr


def test_several_roots_show_absolute_paths(ws: Workspace, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("o\n")
    created = ws.ctl("env", "create", "multi", "--root", str(ws.project), "--root", str(other))
    assert created.returncode == 0, created.stderr
    ws.run(f"echo p > p.txt; echo changed > {other}/o.txt", env="multi")
    lines = ws.ctl("diff", "multi", "--name-status").stdout.splitlines()
    project_shown, other_shown = str(ws.project).lstrip("/"), str(other).lstrip("/")
    assert lines == [f"A\t{project_shown}/p.txt", f"M\t{other_shown}/o.txt"]
    only_other = ws.ctl("diff", "multi", "--name-status", str(other))
    assert only_other.stdout.splitlines() == [f"M\t{str(other).lstrip('/')}/o.txt"]
    result = ws.ctl("commit", "multi")
    assert result.returncode == 0, result.stderr
    assert (other / "o.txt").read_text() == "changed\n"
    assert (ws.project / "p.txt").read_text() == "p\n"


def test_selection_restricts_the_walk(ws: Workspace) -> None:
    ws.run("echo x >> src/main.py; rm -rf docs")
    store = Store(str(ws.store_home))
    env = store.get("e1")
    only_docs = read_changeset(env, Selection(((0, b"docs"),)))
    assert [(c.status, c.rel) for c in only_docs.changes] == [("D", b"docs"),
                                                                ("D", b"docs/guide.txt")]
    assert os.path.exists(ws.project / "docs" / "guide.txt")
