"""Every overlay behaviour of DESIGN §5, through a real agentfs mount over a read-only lower."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from isolated_agent.fusefs.mount import READAHEAD_KIB, mount_entry
from isolated_agent.system import libc
from tests.agentfs.conftest import Agentfs, renameat2, upper_tree, wait_for


def write(path: Path, data: str | bytes) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)


# -- 1. create goes to upper --------------------------------------------------------------------


def test_create_goes_to_upper_and_never_to_lower(fs: Agentfs) -> None:
    (fs.lower / "dir").mkdir()
    mnt = fs.mount()
    write(mnt / "new.txt", "new")
    write(mnt / "dir" / "inner.txt", "inner")
    (mnt / "newdir").mkdir()
    os.mkfifo(mnt / "fifo")
    os.symlink("new.txt", mnt / "sym")
    assert (fs.upper / "new.txt").read_text() == "new"
    assert (fs.upper / "dir" / "inner.txt").read_text() == "inner"
    assert (fs.upper / "newdir").is_dir()
    assert stat.S_ISFIFO(os.lstat(fs.upper / "fifo").st_mode)
    assert os.readlink(fs.upper / "sym") == "new.txt"
    assert sorted(os.listdir(fs.lower)) == ["dir"]
    assert os.listdir(fs.lower / "dir") == []


# -- 2. copy-up on write intent only ------------------------------------------------------------


def test_read_only_access_never_copies_up(fs: Agentfs) -> None:
    (fs.lower / "d").mkdir()
    write(fs.lower / "d" / "f", "data")
    mnt = fs.mount()
    assert (mnt / "d" / "f").read_text() == "data"
    with open(mnt / "d" / "f", "rb") as f:
        f.read()
    os.stat(mnt / "d" / "f")
    os.listdir(mnt / "d")
    os.listxattr(mnt / "d" / "f")
    assert os.listdir(fs.upper) == []


def test_copy_up_keeps_data_mode_owner_times_xattrs_and_parent_modes(fs: Agentfs) -> None:
    (fs.lower / "a" / "b").mkdir(parents=True)
    os.chmod(fs.lower / "a", 0o751)
    os.chmod(fs.lower / "a" / "b", 0o705)
    f = fs.lower / "a" / "b" / "f"
    write(f, "lower data")
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.setxattr(f, "user.note", b"kept")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    mnt = fs.mount()
    os.chmod(mnt / "a" / "b" / "f", 0o640)  # write intent that changes nothing: copy-up
    copied = fs.upper / "a" / "b" / "f"
    st = os.lstat(copied)
    assert copied.read_text() == "lower data"
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 2_000_000_000
    assert os.getxattr(copied, "user.note") == b"kept"
    assert stat.S_IMODE(os.lstat(fs.upper / "a").st_mode) == 0o751
    assert stat.S_IMODE(os.lstat(fs.upper / "a" / "b").st_mode) == 0o705


def test_open_for_writing_copies_up_at_open_or_first_write(fs: Agentfs) -> None:
    """With file handles, an open for writing copies up (the kernel's overlayfs does too);
    handle-free, agentfs never sees the open, and the first write or truncate copies up. Either
    way the data written lands in upper only."""
    write(fs.lower / "f", "lower data")
    mnt = fs.mount()
    with open(mnt / "f", "r+b") as handle:
        assert (fs.upper / "f").exists() == fs.handles
        handle.seek(0, os.SEEK_END)
        handle.write(b"!")
        handle.flush()
        assert (fs.upper / "f").read_text() == "lower data!"
    with open(mnt / "f", "rb") as handle:
        assert handle.read() == b"lower data!"
    assert (fs.lower / "f").read_text() == "lower data"


@pytest.mark.parametrize(
    "change",
    [
        lambda p: os.chmod(p, 0o600),
        lambda p: os.chown(p, 42, 42),
        lambda p: os.utime(p, ns=(5, 5)),
        lambda p: os.setxattr(p, "user.x", b"1"),
        lambda p: os.truncate(p, 2),
        lambda p: os.link(p, p.parent / "hardlink"),
    ],
    ids=["chmod", "chown", "utimes", "setxattr", "truncate", "link"],
)
def test_metadata_changes_copy_up(fs: Agentfs, change: object) -> None:
    write(fs.lower / "f", "content")
    mnt = fs.mount()
    change(mnt / "f")  # type: ignore[operator]
    assert (fs.upper / "f").exists()
    assert (fs.lower / "f").read_text() == "content"


def test_open_with_o_trunc_copies_up_empty(fs: Agentfs) -> None:
    write(fs.lower / "big", b"x" * 1_000_000)
    mnt = fs.mount()
    with open(mnt / "big", "wb") as f:
        f.write(b"short")
    assert (mnt / "big").read_bytes() == b"short"
    assert (fs.upper / "big").read_bytes() == b"short"


def test_write_through_one_handle_is_read_through_another_opened_before_copy_up(
    fs: Agentfs,
) -> None:
    write(fs.lower / "f", "0123456789")
    mnt = fs.mount("cache=none")
    with open(mnt / "f", "rb", buffering=0) as reader:
        assert reader.read(3) == b"012"
        with open(mnt / "f", "r+b", buffering=0) as writer:
            writer.seek(5)
            writer.write(b"XY")
        reader.seek(0)
        assert reader.read() == b"01234XY789"


# -- 3. delete = whiteout; ENOTEMPTY on the merged view -----------------------------------------


def test_delete_of_lower_entries_leaves_whiteouts(fs: Agentfs) -> None:
    write(fs.lower / "f", "x")
    (fs.lower / "d").mkdir()
    os.symlink("f", fs.lower / "s")
    mnt = fs.mount()
    os.unlink(mnt / "f")
    os.rmdir(mnt / "d")
    os.unlink(mnt / "s")
    assert os.listdir(mnt) == []
    assert upper_tree(fs.upper) == {"f": "whiteout", "d": "whiteout", "s": "whiteout"}
    assert sorted(os.listdir(fs.lower)) == ["d", "f", "s"]


def test_delete_of_upper_only_entry_removes_it(fs: Agentfs) -> None:
    mnt = fs.mount()
    write(mnt / "f", "x")
    (mnt / "d").mkdir()
    os.unlink(mnt / "f")
    os.rmdir(mnt / "d")
    assert upper_tree(fs.upper) == {}


def test_delete_of_copied_up_file_leaves_a_whiteout(fs: Agentfs) -> None:
    write(fs.lower / "f", "x")
    mnt = fs.mount()
    write(mnt / "f", "changed")
    os.unlink(mnt / "f")
    assert upper_tree(fs.upper) == {"f": "whiteout"}
    assert not (mnt / "f").exists()


def test_rmdir_of_merged_non_empty_dir_is_enotempty(fs: Agentfs) -> None:
    (fs.lower / "d").mkdir()
    write(fs.lower / "d" / "lower-child", "x")
    mnt = fs.mount()
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    (mnt / "d2").mkdir()
    write(mnt / "d2" / "upper-child", "x")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d2")
    assert e.value.errno == errno.ENOTEMPTY


def test_rmdir_of_dir_emptied_in_the_merged_view(fs: Agentfs) -> None:
    (fs.lower / "d").mkdir()
    write(fs.lower / "d" / "a", "x")
    write(fs.lower / "d" / "b", "x")
    mnt = fs.mount()
    os.unlink(mnt / "d" / "a")
    os.unlink(mnt / "d" / "b")
    os.rmdir(mnt / "d")  # upper holds only whiteouts under d: empty in the merged view
    assert upper_tree(fs.upper) == {"d": "whiteout"}
    assert not (mnt / "d").exists()


# -- 4. delete -> recreate ----------------------------------------------------------------------


def test_delete_then_recreate_gives_an_empty_file(fs: Agentfs) -> None:
    write(fs.lower / "f", "old lower content")
    mnt = fs.mount()
    os.unlink(mnt / "f")
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.close(fd)
    assert (mnt / "f").read_bytes() == b""
    assert (fs.upper / "f").read_bytes() == b""
    write(mnt / "f", "new")
    assert (mnt / "f").read_text() == "new"
    assert (fs.lower / "f").read_text() == "old lower content"


def test_mkdir_over_whited_out_dir_is_opaque_and_empty(fs: Agentfs) -> None:
    (fs.lower / "d" / "sub").mkdir(parents=True)
    write(fs.lower / "d" / "f", "x")
    mnt = fs.mount()
    os.unlink(mnt / "d" / "f")
    os.rmdir(mnt / "d" / "sub")
    os.rmdir(mnt / "d")
    (mnt / "d").mkdir()
    assert os.listdir(mnt / "d") == []
    assert upper_tree(fs.upper) == {"d": "dir,opaque"}
    fs.remount()
    assert os.listdir(fs.mnt / "d") == []


def test_recreate_other_kinds_over_whiteouts(fs: Agentfs) -> None:
    write(fs.lower / "a", "x")
    write(fs.lower / "b", "x")
    (fs.lower / "c").mkdir()
    mnt = fs.mount()
    for name in ("a", "b"):
        os.unlink(mnt / name)
    os.rmdir(mnt / "c")
    os.symlink("target", mnt / "a")
    os.mkfifo(mnt / "b")
    write(mnt / "c", "file where a dir was")
    assert os.readlink(mnt / "a") == "target"
    assert stat.S_ISFIFO(os.lstat(mnt / "b").st_mode)
    assert (mnt / "c").read_text() == "file where a dir was"
    assert upper_tree(fs.upper) == {"a": "link:target", "b": upper_tree(fs.upper)["b"],
                                    "c": "file:b'file where a dir was'"}


# -- 5. listing -----------------------------------------------------------------------------------


def test_listing_is_union_minus_whiteouts_each_name_once(fs: Agentfs) -> None:
    for name in ("both", "lower-only", "deleted"):
        write(fs.lower / name, "lower")
    (fs.lower / "dir").mkdir()
    mnt = fs.mount()
    write(mnt / "both", "upper")
    write(mnt / "upper-only", "upper")
    os.unlink(mnt / "deleted")
    names = os.listdir(mnt)
    assert sorted(names) == ["both", "dir", "lower-only", "upper-only"]
    assert len(names) == len(set(names))
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
             for e in os.scandir(mnt)}
    assert kinds["dir"] == (True, False)
    assert kinds["both"] == (False, True)


def test_dot_and_dotdot_are_listed_and_correct(fs: Agentfs) -> None:
    (fs.lower / "d" / "e").mkdir(parents=True)
    mnt = fs.mount()
    entries = dict(_getdents(mnt / "d" / "e"))
    assert set(entries) == {b".", b".."}
    assert entries[b"."] == os.stat(mnt / "d" / "e").st_ino
    assert entries[b".."] == os.stat(mnt / "d").st_ino


@pytest.mark.slow
def test_paged_readdir_of_10000_entries_returns_each_name_once(fs: Agentfs) -> None:
    big = fs.lower / "big"
    big.mkdir()
    for i in range(0, 10_000, 2):
        (big / f"lower-{i:05d}").touch()
    for i in range(0, 2_000, 10):
        (big / f"shadowed-{i:05d}").touch()
    mnt = fs.mount()
    for i in range(1, 10_000, 2):
        (mnt / "big" / f"upper-{i:05d}").touch()
    for i in range(0, 2_000, 10):
        write(mnt / "big" / f"shadowed-{i:05d}", "now in upper too")
    for i in range(0, 1_000, 4):
        os.unlink(mnt / "big" / f"lower-{i:05d}")
    expected = {f"lower-{i:05d}" for i in range(0, 10_000, 2) if not (i < 1_000 and i % 4 == 0)}
    expected |= {f"upper-{i:05d}" for i in range(1, 10_000, 2)}
    expected |= {f"shadowed-{i:05d}" for i in range(0, 2_000, 10)}
    for buffer_size in (512, 4096, 65536):  # many small pages, and a few large ones
        names = [n for n, _ in _getdents(mnt / "big", buffer_size)]
        names = [os.fsdecode(n) for n in names if n not in (b".", b"..")]
        assert len(names) == len(set(names)) == len(expected)
        assert set(names) == expected


def test_seekdir_telldir_resume_where_they_left(fs: Agentfs) -> None:
    d = fs.lower / "d"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").touch()
    mnt = fs.mount()
    for i in range(300, 400):
        (mnt / "d" / f"f{i:03d}").touch()
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _getdents_fd(fd, 1024)  # one page
        position = os.lseek(fd, 0, os.SEEK_CUR)  # telldir
        rest = _drain(fd)
        os.lseek(fd, position, os.SEEK_SET)  # seekdir back
        again = _drain(fd)
        os.lseek(fd, 0, os.SEEK_SET)  # rewinddir
        everything = _drain(fd)
    finally:
        os.close(fd)
    assert rest == again
    assert [n for n, _ in first + rest] == [n for n, _ in everything]
    assert len({n for n, _ in everything}) == 402


# -- 6. to 9. rename ---------------------------------------------------------------------------


def test_rename_of_upper_only_entries_is_in_place(fs: Agentfs) -> None:
    mnt = fs.mount()
    (mnt / "d" / "sub").mkdir(parents=True)
    write(mnt / "d" / "sub" / "f", "kept")
    write(mnt / "file", "file")
    inode = os.stat(mnt / "d").st_ino
    os.rename(mnt / "d", mnt / "moved")
    os.rename(mnt / "file", mnt / "moved" / "file2")
    assert (mnt / "moved" / "sub" / "f").read_text() == "kept"
    assert (mnt / "moved" / "file2").read_text() == "file"
    assert os.stat(mnt / "moved").st_ino == inode
    assert upper_tree(fs.upper) == {
        "moved": "dir", "moved/sub": "dir", "moved/sub/f": "file:b'kept'",
        "moved/file2": "file:b'file'",
    }


def test_rename_of_populated_lower_dir(fs: Agentfs) -> None:
    tree = fs.lower / "project" / "pkg"
    (tree / "deep" / "deeper").mkdir(parents=True)
    for i in range(20):
        write(tree / f"m{i}.py", f"module {i}")
    write(tree / "deep" / "deeper" / "leaf", "leaf")
    os.symlink("m0.py", tree / "alias")
    mnt = fs.mount()
    os.rename(mnt / "project" / "pkg", mnt / "project" / "pkg2")  # no EXDEV
    assert not (mnt / "project" / "pkg").exists()
    assert (mnt / "project" / "pkg2" / "m7.py").read_text() == "module 7"
    assert (mnt / "project" / "pkg2" / "deep" / "deeper" / "leaf").read_text() == "leaf"
    assert os.readlink(mnt / "project" / "pkg2" / "alias") == "m0.py"
    assert len(os.listdir(mnt / "project" / "pkg2")) == 22
    up = upper_tree(fs.upper)
    assert up["project/pkg"] == "whiteout"
    assert up["project/pkg2"] == "dir,opaque"
    fs.remount()
    assert sorted(os.listdir(fs.mnt / "project")) == ["pkg2"]
    assert (fs.mnt / "project" / "pkg2" / "m19.py").read_text() == "module 19"


def test_rename_of_lower_dir_keeps_open_files_and_inodes(fs: Agentfs) -> None:
    (fs.lower / "d").mkdir()
    write(fs.lower / "d" / "f", "before")
    mnt = fs.mount()
    inode = os.stat(mnt / "d" / "f").st_ino
    with open(mnt / "d" / "f", "rb") as reader:
        os.rename(mnt / "d", mnt / "e")
        write(mnt / "e" / "f", "after!")
        assert reader.read() == b"after!"
    assert os.stat(mnt / "e" / "f").st_ino == inode


def test_mixed_dir_rename_keeps_the_upper_edit(fs: Agentfs) -> None:
    (fs.lower / "d" / "sub").mkdir(parents=True)
    write(fs.lower / "d" / "edited", "lower version")
    write(fs.lower / "d" / "untouched", "lower only")
    write(fs.lower / "d" / "deleted", "gone")
    write(fs.lower / "d" / "sub" / "x", "x")
    mnt = fs.mount()
    write(mnt / "d" / "edited", "upper edit")
    write(mnt / "d" / "added", "new")
    os.unlink(mnt / "d" / "deleted")
    write(mnt / "d" / "sub" / "y", "y")
    os.rename(mnt / "d", mnt / "d2")
    assert sorted(os.listdir(mnt / "d2")) == ["added", "edited", "sub", "untouched"]
    assert (mnt / "d2" / "edited").read_text() == "upper edit"
    assert (mnt / "d2" / "untouched").read_text() == "lower only"
    assert sorted(os.listdir(mnt / "d2" / "sub")) == ["x", "y"]
    assert not (mnt / "d").exists()
    fs.remount()
    assert (fs.mnt / "d2" / "edited").read_text() == "upper edit"
    assert sorted(os.listdir(fs.mnt / "d2")) == ["added", "edited", "sub", "untouched"]


def test_rename_onto_a_whited_out_name_makes_it_visible(fs: Agentfs) -> None:
    write(fs.lower / "target", "old lower")
    (fs.lower / "dirtarget" / "inside").mkdir(parents=True)
    mnt = fs.mount()
    os.unlink(mnt / "target")
    write(mnt / "source", "renamed in")
    os.rename(mnt / "source", mnt / "target")
    assert (mnt / "target").read_text() == "renamed in"
    assert upper_tree(fs.upper)["target"] == "file:b'renamed in'"
    os.rmdir(mnt / "dirtarget" / "inside")
    os.rmdir(mnt / "dirtarget")
    (mnt / "newdir").mkdir()
    write(mnt / "newdir" / "f", "f")
    os.rename(mnt / "newdir", mnt / "dirtarget")
    assert os.listdir(mnt / "dirtarget") == ["f"]  # the lower dir's `inside` stays hidden
    assert upper_tree(fs.upper)["dirtarget"] == "dir,opaque"
    assert "newdir" not in upper_tree(fs.upper)
    fs.remount()
    assert os.listdir(fs.mnt / "dirtarget") == ["f"]
    assert (fs.mnt / "target").read_text() == "renamed in"


def test_rename_over_existing_files_and_empty_dirs(fs: Agentfs) -> None:
    write(fs.lower / "a", "a")
    write(fs.lower / "b", "b")
    (fs.lower / "emptied").mkdir()
    write(fs.lower / "emptied" / "x", "x")
    mnt = fs.mount()
    os.rename(mnt / "a", mnt / "b")
    assert (mnt / "b").read_text() == "a"
    assert not (mnt / "a").exists()
    os.unlink(mnt / "emptied" / "x")
    (mnt / "src").mkdir()
    os.rename(mnt / "src", mnt / "emptied")  # over a merged dir that is empty in the view
    assert os.listdir(mnt / "emptied") == []
    with pytest.raises(OSError) as e:
        os.rename(mnt / "b", mnt / "emptied")
    assert e.value.errno == errno.EISDIR


# -- 10. flags, links, special files, xattrs, big and odd files ----------------------------------


def test_rename_noreplace(fs: Agentfs) -> None:
    write(fs.lower / "a", "a")
    write(fs.lower / "b", "b")
    mnt = fs.mount()
    with pytest.raises(OSError) as e:
        renameat2(mnt / "a", mnt / "b", libc.RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    renameat2(mnt / "a", mnt / "c", libc.RENAME_NOREPLACE)
    assert (mnt / "c").read_text() == "a"
    assert not (mnt / "a").exists()


def test_rename_exchange(fs: Agentfs) -> None:
    write(fs.lower / "lowerfile", "L")
    (fs.lower / "lowerdir").mkdir()
    write(fs.lower / "lowerdir" / "in", "in lower dir")
    mnt = fs.mount()
    write(mnt / "upperfile", "U")
    renameat2(mnt / "lowerfile", mnt / "upperfile", libc.RENAME_EXCHANGE)
    assert (mnt / "lowerfile").read_text() == "U"
    assert (mnt / "upperfile").read_text() == "L"
    (mnt / "upperdir").mkdir()
    write(mnt / "upperdir" / "mine", "mine")
    renameat2(mnt / "lowerdir", mnt / "upperdir", libc.RENAME_EXCHANGE)
    assert os.listdir(mnt / "lowerdir") == ["mine"]
    assert os.listdir(mnt / "upperdir") == ["in"]
    with pytest.raises(OSError) as e:
        renameat2(mnt / "lowerfile", mnt / "missing", libc.RENAME_EXCHANGE)
    assert e.value.errno == errno.ENOENT
    fs.remount()
    assert os.listdir(fs.mnt / "lowerdir") == ["mine"]
    assert (fs.mnt / "upperdir" / "in").read_text() == "in lower dir"


def test_hard_links_across_copy_up(fs: Agentfs) -> None:
    write(fs.lower / "orig", "shared")
    mnt = fs.mount()
    os.link(mnt / "orig", mnt / "second")
    assert os.stat(mnt / "orig").st_ino == os.stat(mnt / "second").st_ino
    assert os.stat(mnt / "orig").st_nlink == 2
    with open(mnt / "second", "a") as f:
        f.write(" and changed")
    assert (mnt / "orig").read_text() == "shared and changed"
    assert os.stat(fs.upper / "orig").st_ino == os.stat(fs.upper / "second").st_ino
    os.unlink(mnt / "orig")
    assert (mnt / "second").read_text() == "shared and changed"
    assert os.stat(mnt / "second").st_nlink == 1
    assert (fs.lower / "orig").read_text() == "shared"


def test_hard_links_of_upper_files(fs: Agentfs) -> None:
    mnt = fs.mount()
    write(mnt / "a", "1")
    os.link(mnt / "a", mnt / "b")
    write(mnt / "b", "2")
    assert (mnt / "a").read_text() == "2"
    fs.remount()
    assert os.stat(fs.mnt / "a").st_ino == os.stat(fs.mnt / "b").st_ino
    # The kernel forgets the inode between two stats (as under memory pressure): the file
    # keeps its number, so its two names still show one.
    first = os.stat(fs.mnt / "a").st_ino
    Path("/proc/sys/vm/drop_caches").write_text("2")
    time.sleep(0.2)  # the FORGETs reach the daemon
    assert os.stat(fs.mnt / "b").st_ino == first


def test_symlinks_and_fifos(fs: Agentfs) -> None:
    write(fs.lower / "target", "t")
    os.symlink("target", fs.lower / "lowlink")
    os.symlink("/nonexistent/abs", fs.lower / "dangling")
    os.mkfifo(fs.lower / "lowfifo")
    mnt = fs.mount()
    assert os.readlink(mnt / "lowlink") == "target"
    assert (mnt / "lowlink").read_text() == "t"
    assert os.readlink(mnt / "dangling") == "/nonexistent/abs"
    assert stat.S_ISFIFO(os.lstat(mnt / "lowfifo").st_mode)
    os.rename(mnt / "lowlink", mnt / "movedlink")  # copy-up of a symlink
    assert os.readlink(fs.upper / "movedlink") == "target"
    os.chmod(mnt / "lowfifo", 0o600)  # copy-up of a fifo
    assert stat.S_ISFIFO(os.lstat(fs.upper / "lowfifo").st_mode)
    with pytest.raises(OSError) as e:
        os.mknod(mnt / "fake-whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert e.value.errno == errno.EPERM


def test_xattrs(fs: Agentfs) -> None:
    write(fs.lower / "f", "x")
    os.setxattr(fs.lower / "f", "user.lower", b"from lower")
    (fs.lower / "d").mkdir()
    mnt = fs.mount()
    assert os.getxattr(mnt / "f", "user.lower") == b"from lower"
    os.setxattr(mnt / "f", "user.new", b"\x00binary\xff")
    os.setxattr(mnt / "d", "user.ondir", b"dir")
    assert sorted(os.listxattr(mnt / "f")) == ["user.lower", "user.new"]
    assert os.getxattr(mnt / "f", "user.new") == b"\x00binary\xff"
    os.removexattr(mnt / "f", "user.lower")
    assert os.listxattr(mnt / "f") == ["user.new"]
    assert os.listxattr(fs.lower / "f") == ["user.lower"]
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "f", "user.missing")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(mnt / "f", "user.new", b"again", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    # The overlay's own markers never show, and cannot be forged through the view.
    os.rmdir(mnt / "d")
    (mnt / "d").mkdir()
    assert "user.overlay.opaque" not in os.listxattr(mnt / "d")
    with pytest.raises(OSError):
        os.setxattr(mnt / "f", "user.overlay.opaque", b"y")


def test_non_utf8_names(fs: Agentfs) -> None:
    odd = b"caf\xe9-\xff\xfe"
    (fs.lower / os.fsdecode(odd)).write_bytes(b"latin-1 name")
    mnt = fs.mount()
    root = os.fsencode(mnt)
    assert odd in os.listdir(root)
    with open(os.path.join(root, odd), "rb") as f:
        assert f.read() == b"latin-1 name"
    other = b"\x80\x81 new"
    with open(os.path.join(root, other), "wb") as f:
        f.write(b"made here")
    os.rename(os.path.join(root, odd), os.path.join(root, b"renamed-\xe9"))
    assert sorted(os.listdir(root)) == sorted([other, b"renamed-\xe9"])
    assert os.path.exists(os.path.join(os.fsencode(fs.upper), other))


def test_long_names(fs: Agentfs) -> None:
    mnt = fs.mount()
    write(mnt / ("n" * 255), "max")
    with pytest.raises(OSError) as e:
        write(mnt / ("n" * 256), "too long")
    assert e.value.errno == errno.ENAMETOOLONG


@pytest.mark.slow
def test_sparse_2gb_file(fs: Agentfs) -> None:
    size = 2 * 1024**3
    with open(fs.lower / "sparse", "wb") as f:
        f.seek(size - 5)
        f.write(b"tail!")
        f.seek(1 << 20)
        f.write(b"middle")
    mnt = fs.mount()
    assert os.stat(mnt / "sparse").st_size == size
    with open(mnt / "sparse", "r+b") as f:  # copy-up of 2 GB that is mostly a hole
        f.seek(size - 5)
        assert f.read() == b"tail!"
        f.seek(1 << 20)
        assert f.read(6) == b"middle"
        f.seek(size)
        f.write(b"+more")
    st = os.stat(fs.upper / "sparse")
    assert st.st_size == size + 5
    assert st.st_blocks * 512 < 64 * 1024**2, "the holes were filled in"
    with open(mnt / "sparse", "rb") as f:
        f.seek(12345)
        assert f.read(10) == b"\x00" * 10


def test_large_file_streams(fs: Agentfs) -> None:
    block = os.urandom(1 << 20)
    with open(fs.lower / "large", "wb") as f:
        for _ in range(64):
            f.write(block)
    mnt = fs.mount()
    with open(mnt / "large", "ab") as f:
        f.write(b"end")
    with open(mnt / "large", "rb") as f:
        for _ in range(64):
            assert f.read(1 << 20) == block
        assert f.read() == b"end"


# -- open files ------------------------------------------------------------------------------------


def test_deleting_and_renaming_open_files(fs: Agentfs) -> None:
    write(fs.lower / "lowerfile", "lower")
    mnt = fs.mount()
    write(mnt / "upperfile", "upper")
    with open(mnt / "upperfile", "r+b") as up, open(mnt / "lowerfile", "rb") as low:
        os.unlink(mnt / "upperfile")
        os.unlink(mnt / "lowerfile")
        up.write(b"still writable")
        up.flush()
        up.seek(0)
        assert up.read() == b"still writable"
        assert low.read() == b"lower"
        assert os.fstat(up.fileno()).st_nlink == 0
    assert os.listdir(mnt) == []
    write(mnt / "f", "x")
    with open(mnt / "f", "r+b") as f:
        os.rename(mnt / "f", mnt / "g")
        f.write(b"y")
    assert (mnt / "g").read_text() == "y"


def test_unknown_nodes_after_forget_stay_stable(fs: Agentfs) -> None:
    for i in range(50):
        write(fs.lower / f"f{i}", str(i))
    mnt = fs.mount()
    before = {n: os.stat(mnt / n).st_ino for n in os.listdir(mnt)}
    with open("/proc/sys/vm/drop_caches", "w") as f:  # the kernel forgets its inodes
        f.write("2")
    after = {n: os.stat(mnt / n).st_ino for n in os.listdir(mnt)}
    assert before == after
    write(mnt / "f3", "copied up")
    assert os.stat(mnt / "f3").st_ino == before["f3"]


# -- several lower layers (a fork's stack) ------------------------------------------------------


def test_several_lowers_with_their_own_whiteouts_and_opaque_dirs(fs_factory: object) -> None:
    fs = fs_factory("stack", lower_count=2)  # type: ignore[operator]
    top, bottom = fs.lowers
    write(bottom / "base", "bottom")
    write(bottom / "hidden", "bottom")
    (bottom / "d").mkdir()
    write(bottom / "d" / "bottom-child", "b")
    (bottom / "opq").mkdir()
    write(bottom / "opq" / "masked", "m")
    write(top / "base", "top wins")
    os.mknod(top / "hidden", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout in a lower layer
    (top / "d").mkdir()
    write(top / "d" / "top-child", "t")
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "user.overlay.opaque", b"y")
    write(top / "opq" / "visible", "v")
    mnt = fs.mount()
    assert sorted(os.listdir(mnt)) == ["base", "d", "opq"]
    assert (mnt / "base").read_text() == "top wins"
    assert sorted(os.listdir(mnt / "d")) == ["bottom-child", "top-child"]
    assert os.listdir(mnt / "opq") == ["visible"]
    os.rename(mnt / "d", mnt / "d2")
    assert sorted(os.listdir(mnt / "d2")) == ["bottom-child", "top-child"]
    write(mnt / "hidden", "recreated")
    assert (mnt / "hidden").read_text() == "recreated"


# -- getdents64, to page through a directory with a chosen buffer size -------------------------

import ctypes  # noqa: E402
import struct  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217


def _getdents_fd(fd: int, buffer_size: int) -> list[tuple[bytes, int]]:
    """One getdents64 call: [(name, d_ino)]."""
    buf = ctypes.create_string_buffer(buffer_size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, buffer_size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    result, offset, raw = [], 0, buf.raw[:n]
    while offset < n:
        d_ino, _d_off, reclen, _d_type = struct.unpack_from("QqHB", raw, offset)
        name = raw[offset + 19 : offset + reclen].split(b"\0", 1)[0]
        result.append((name, d_ino))
        offset += reclen
    return result


def _drain(fd: int, buffer_size: int = 1024) -> list[tuple[bytes, int]]:
    entries = []
    while True:
        page = _getdents_fd(fd, buffer_size)
        if not page:
            return entries
        entries += page


def _getdents(path: Path, buffer_size: int = 4096) -> list[tuple[bytes, int]]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _drain(fd, buffer_size)
    finally:
        os.close(fd)


def test_lower_file_opened_then_deleted_then_written_and_read(fs: Agentfs) -> None:
    """The write lands in a copy that no name reaches (made at the open with file handles, at
    the write handle-free), as in the kernel's overlayfs; the descriptor reads it back; the
    upper keeps only the whiteout, the work dir nothing."""
    write(fs.lower / "f", "lower data")
    mnt = fs.mount()
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        os.unlink(mnt / "f")
        assert os.pwrite(fd, b"LOWER", 0) == 5
        assert os.pread(fd, 100, 0) == b"LOWER data"
    finally:
        os.close(fd)
    assert not (mnt / "f").exists()
    assert upper_tree(fs.upper) == {"f": "whiteout"}
    assert os.listdir(fs.work / "work") == []


def test_the_mount_reads_ahead_a_mib(fs: Agentfs) -> None:
    """A sequential read arrives in READs of up to 1 MiB, not FUSE's default 128 KiB (the
    daemon raises it as soon as the kernel has its answer to FUSE_INIT)."""
    mnt = fs.mount()
    entry = mount_entry(str(mnt))
    assert entry is not None
    knob = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    wait_for(lambda: int(knob.read_text()) == READAHEAD_KIB, what="the read-ahead raised")
