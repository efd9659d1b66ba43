"""Real tools in every engine give what they give natively, and commit makes the host exactly that.

Each workload runs three ways on the same project, as root, as an unprivileged user (the
rootless path: user namespaces, fusermount3), and as root on the user's tree (RUNS):

- in an env (`agentctl run --engine E`), then the env's view is read from inside a second job;
- natively on a pristine copy mounted at the project's own path (a private mount namespace), so
  that paths written into files — a venv's scripts, npm's lock file — are the same;
- and after `agentctl commit`, the host itself is read.

The three must agree on every entry's type, permission bits, content and data xattrs. Compiled
Python (`.pyc`) embeds its source's mtime and git's index the files' stat data: for those, only
the entry is compared. No network: the Python project installs itself in development mode with
the venv's own setuptools (pip would want the wheel package), npm from a tarball packed
beforehand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DISK_SCRATCH_PREFIX, SYSTEM_PYTHON, as_user
from tests.filter.conftest import stop_filter_daemons

pytestmark = pytest.mark.slow

# Prints the tree under the current directory as JSON: path -> [type, perms, content, xattrs].
STATE = r"""
import hashlib, json, os, stat
unstable = (".pyc", ".git/index")
state = {}
for dirpath, dirnames, filenames in os.walk("."):
    for name in dirnames + filenames:
        path = os.path.join(dirpath, name)[2:]
        st = os.lstat(path)
        content = None
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(st.st_mode) and not path.endswith(unstable):
            content = hashlib.sha256(open(path, "rb").read()).hexdigest()
        xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False).hex())
                        for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
        state[path] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content, xattrs]
print(json.dumps(state, sort_keys=True))
"""

PYTHON_PROJECT = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "demo"
        version = "1.0"
        """,
    "setup.py": "from setuptools import setup\nsetup()\n",
    "src/demo/__init__.py": "def add(a, b):\n    return a + b\n",
    "tests/test_add.py": """\
        import unittest
        from demo import add

        class AddTest(unittest.TestCase):
            def test_add(self):
                self.assertEqual(add(2, 3), 5)
        """,
}

C_PROJECT = {
    **{f"f{i}.c": f"int f{i}(void) {{ return {i}; }}\n" for i in range(20)},
    "main.c": "#include <stdio.h>\n"
              + "".join(f"int f{i}(void);\n" for i in range(20))
              + "int main(void) { printf(\"%d\\n\", "
              + " + ".join(f"f{i}()" for i in range(20)) + "); return 0; }\n",
    "Makefile": """\
        OBJS = $(patsubst %.c,%.o,$(wildcard *.c))
        prog: $(OBJS)
        \t$(CC) -o $@ $(OBJS)
        clean:
        \trm -f *.o prog
        """,
}

WORKLOADS = {
    "python-venv-tests": (PYTHON_PROJECT, """
        python3 -m venv .venv
        .venv/bin/python setup.py -q develop
        .venv/bin/python -m unittest discover -s tests -q
    """),
    "c-build-and-clean": (C_PROJECT, """
        make -s -j2 && ./prog > out.txt
        make -s clean
        make -s -j2 && ./prog >> out.txt
    """),
    "git-branch-checkout-stash": ({"README": "one\n", "src/a.txt": "a\n"}, """
        git init -q -b main . && git add . && git commit -qm init
        git checkout -qb feature && echo two >> README && git commit -qam feature
        git checkout -q main && echo dirty >> src/a.txt && echo new > src/b.txt
        git stash -q -u && git checkout -q feature && git checkout -q main && git stash pop -q
        git log --oneline --all > log.txt
    """),
    "npm-install-offline": ({"README": "node project\n"}, """
        npm init -y >/dev/null
        npm install --offline --no-audit --no-fund "$TARBALL" >/dev/null
        node -e "console.log(require('left-local')('x', 4))" > out.txt
    """),
    "xattrs-only": ({"README": "tagged\n", "docs/guide": "g\n"}, """
        setfattr -n user.tag -v reviewed README
        setfattr -n user.dir -v 1 docs
    """),
    "npm-over-host-node-modules": ({"README": "node project\n"}, """
        npm uninstall --offline --no-audit --no-fund left-local >/dev/null
        npm install --offline --no-audit --no-fund "$TARBALL" >/dev/null
        node -e "console.log(require('left-local')('x', 4))" > out.txt
    """),
}

# Run natively on the project before anything else: what the host already has.
HOST_SETUP = {
    "npm-over-host-node-modules": """
        npm init -y >/dev/null
        npm install --offline --no-audit --no-fund "$TARBALL" >/dev/null
    """,
}

# Who runs agentctl: root on its own tree, an unprivileged user on theirs (the filter runs
# no root job), and root on a tree the user owns (engines/id_swap.py), where the native run
# is root's too — but for git, which natively refuses a repository another user owns.
RUNS = [
    *(("root", engine, w) for engine in ("kernel", "fuse") for w in WORKLOADS),
    *(("user", engine, w) for engine in ("kernel", "fuse", "filter") for w in WORKLOADS),
    *(("root-in-users-tree", engine, w) for engine in ("kernel", "fuse") for w in WORKLOADS
      if not w.startswith("git")),
]


@pytest.fixture(scope="module")
def tarball() -> Iterator[Path]:
    """A local npm package, packed: what `npm install` gets instead of the registry."""
    base = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "npm-"))
    base.chmod(0o755)  # rootless jobs read the tarball too
    package = base / "left-local"
    package.mkdir()
    (package / "package.json").write_text(json.dumps(
        {"name": "left-local", "version": "1.0.0", "main": "index.js"}))
    (package / "index.js").write_text(
        "module.exports = (s, n) => s.padStart(n, '.');\n")
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    subprocess.run(["npm", "pack", "--silent", str(package)], cwd=base, check=True,
                   capture_output=True, env={**os.environ, "HOME": str(base)})
    yield base / "left-local-1.0.0.tgz"
    shutil.rmtree(base, ignore_errors=True)


def _differences(got: dict[str, object], native: dict[str, object]) -> dict[str, object]:
    """Each path whose entry differs: (what we got, what the native run made)."""
    return {path: (got.get(path), native.get(path)) for path in sorted(got.keys() | native)
            if got.get(path) != native.get(path)}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize(("who", "engine", "workload"), RUNS)
def test_a_real_workload_matches_its_native_run(
    who: str, engine: str, workload: str, tarball: Path, request: pytest.FixtureRequest
) -> None:
    base = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "work-"))
    base.chmod(0o755)
    project, pristine, home = base / "project", base / "pristine", base / "home"
    store = base / "store"
    files, script = WORKLOADS[workload]
    project.mkdir()
    home.mkdir()
    _write(project, files)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/usr/sbin:/bin",  # the same programs, job and native
        "ISOLATED_AGENT_HOME": str(store), "HOME": str(home),
        "TARBALL": str(tarball), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z", "npm_config_update_notifier": "false",
    }
    script = textwrap.dedent(script).strip().replace("\n", " && ")
    if workload in HOST_SETUP:
        setup = textwrap.dedent(HOST_SETUP[workload]).strip().replace("\n", " && ")
        subprocess.run(["sh", "-c", setup], cwd=project, env=env, check=True, timeout=300)
    shutil.copytree(project, pristine, symlinks=True)
    prefix = [sys.executable]
    owner = None  # who owns the project (and the native run's copy), when not who runs
    if who == "root-in-users-tree":
        user = request.getfixturevalue("unprivileged_user")
        owner = f"{user.pw_uid}:{user.pw_gid}"
        subprocess.run(["chown", "-R", owner, str(project)], check=True)
    if who == "user":  # as the rootless tests run: Debian's python, a readable package copy
        user = request.getfixturevalue("unprivileged_user")
        package = request.getfixturevalue("package_copy")
        request.getfixturevalue("fuse_open_to_users")
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)
        prefix = as_user(project, SYSTEM_PYTHON, env={**env, "PYTHONPATH": str(package)})

    def agentctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, "-m", "isolated_agent", *args],
                              cwd="/" if who == "user" else project, env=env,
                              capture_output=True, text=True, timeout=600)

    try:
        ran = agentctl("run", "-q", "--engine", engine, "--", "sh", "-c", script)
        assert ran.returncode == 0, ran.stderr
        seen = agentctl("run", "-q", "--engine", engine, "--", "python3", "-c", STATE)
        assert seen.returncode == 0, seen.stderr
        in_env = json.loads(seen.stdout)
        if engine == "filter":  # a user's filter mount is theirs alone (root's checks below)
            agentctl("filter", "stop", str(project))

        natively = pristine.parent / "native"
        shutil.copytree(pristine, natively, symlinks=True)
        if owner is not None:
            subprocess.run(["chown", "-R", owner, str(natively)], check=True)
        native_run = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && cd "$2" && sh -c "$3"',
             "-", str(natively), str(project), script],
            env=env, capture_output=True, text=True, timeout=600)
        assert native_run.returncode == 0, native_run.stderr
        assert ran.stdout == native_run.stdout
        native = json.loads(subprocess.run([sys.executable, "-c", STATE], cwd=natively,
                                           capture_output=True, text=True, check=True).stdout)
        assert _differences(in_env, native) == {}

        committed = agentctl("commit")
        assert committed.returncode == 0, committed.stderr
        host = json.loads(subprocess.run([sys.executable, "-c", STATE], cwd=project,
                                         capture_output=True, text=True, check=True).stdout)
        assert _differences(host, native) == {}
    finally:
        stop_filter_daemons(store)
        shutil.rmtree(base, ignore_errors=True)
