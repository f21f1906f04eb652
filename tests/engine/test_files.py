"""write_atomic: all or nothing, and the permissions a plain write would give."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from nst.engine.files import in_the_way, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_a_plain_writes_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the umask gives an ordinary new file
    out = write_atomic(tmp_path / "sub" / "out.txt", lambda tmp: tmp.write_text("hello"))
    assert out.read_text() == "hello"
    assert _mode(out) == _mode(plain)  # not mkstemp's 0600


def test_replaced_file_keeps_its_permissions(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    out.chmod(0o640)
    write_atomic(out, lambda tmp: tmp.write_text("new"))
    assert out.read_text() == "new" and _mode(out) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")

    def half(tmp):
        tmp.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, half)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_ctrl_c_as_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch):
    """Python raises a Ctrl-C when the system call that was running returns: here, the one that
    has just created the temporary. It must still be removed (mkstemp's, made before the write's
    `try`, was left behind: a batch interrupted between snapshots kept a `.tmp`)."""
    import os

    import nst.engine.files as files

    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.txt", lambda tmp: tmp.write_text("new"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_temporaries_name_their_writer_and_only_stale_ones_go(tmp_path, killed_writer):
    """A killed writer's temporary is stale at once; a live writer's (this process's) is kept;
    an untagged one (an older nst's) goes only once it is old; a user's file is never matched."""
    import os
    import tempfile
    import time

    from nst.engine.files import STALE_AFTER, remove, temp_prefix, temporaries_beside

    out = tmp_path / "out.png"
    dead = killed_writer(out, tmp_path / "out.0003.png")  # the output and a --save-every snapshot
    fd, live = tempfile.mkstemp(dir=tmp_path, prefix=temp_prefix("out"), suffix=".png.tmp")
    os.close(fd)
    young, old = tmp_path / ".out.0001.abcd1234.png.tmp", tmp_path / ".out.0002.wxyz5678.png.tmp"
    young.write_bytes(b"y")
    old.write_bytes(b"o")
    then = time.time() - STALE_AFTER - 60
    os.utime(old, (then, then))
    (tmp_path / ".out.notes.txt").write_text("mine")  # not a temporary's name
    found = {t.path.name: t for t in temporaries_beside(out)}
    assert len(found) == 5
    killed = [t for t in found.values() if t.writer == dead]
    assert len(killed) == 2 and all(t.stale and t.bytes == 1000 for t in killed)
    assert found[Path(live).name].writer == os.getpid() and not found[Path(live).name].stale
    assert not found[young.name].stale and found[old.name].stale and found[old.name].writer is None
    removed = remove(found.values())
    assert {t.path.name for t in removed} == {t.path.name for t in killed} | {old.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.notes.txt", Path(live).name, young.name])


def test_a_folder_or_a_file_in_the_way_is_an_error_naming_the_path_not_a_temporary(tmp_path):
    """Writing over a folder used to fail at the rename as `.<stem>.~<pid>...tmp: Is a directory`,
    and under a file as mkdir's `<file>: File exists`. Both now name the path asked for, before
    any temporary is made."""
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    with pytest.raises(IsADirectoryError) as e:
        write_atomic(folder, lambda tmp: tmp.write_text("y"))
    assert e.value.filename == str(folder) and e.value.strerror == "is a folder, not a file"
    with pytest.raises(NotADirectoryError) as e:
        write_atomic(file / "sub" / "r.json", lambda tmp: tmp.write_text("y"))
    assert e.value.filename == str(file / "sub" / "r.json") and e.value.strerror == f"cannot make its folder: {file} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and list(folder.iterdir()) == [] and file.read_text() == "x"


def test_in_the_way_for_files_and_folders(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    assert in_the_way(tmp_path / "new" / "deeper" / "o.png") is None  # missing folders are made
    assert in_the_way(file) is None and in_the_way(folder, folder=True) is None  # replaced / written into
    assert in_the_way(folder) == f"{folder} is a folder"
    assert in_the_way(file, folder=True) == f"{file} is a file, not a folder"
    assert in_the_way(file / "a" / "b.json") == f"{file} is a file, not a folder"
    assert in_the_way(file / "frames", folder=True) == f"{file} is a file, not a folder"


def test_a_symbolic_link_is_written_through(tmp_path):
    """The link stays a link and its target gets the new file (it was replaced by a plain file)."""
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target.name)
    assert write_atomic(link, lambda tmp: tmp.write_text("new")) == link  # named as asked
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_written_into_not_replaced(tmp_path):
    """A FIFO (as /dev/stdout or /dev/null are devices) is written into, as `>` would: renaming
    over it replaced /dev/stdout with a regular file when run as root."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_atomic(fifo, lambda tmp: tmp.write_text("report"))
    reader.join(timeout=10)
    assert got == ["report"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_an_open_descriptors_name_is_written_through_the_descriptor(tmp_path):
    """`--report /dev/stdout >> log`: /dev/stdout leads to the log itself, a regular file, and the
    rename replaced it (what it held was lost, and later output went to the unlinked file)."""
    log = tmp_path / "log"
    log.write_text("prev\n")
    inode = log.stat().st_ino
    with open(log, "a") as f:
        write_atomic(Path(f"/dev/fd/{f.fileno()}"), lambda tmp: tmp.write_text("report\n"))
        f.write("after\n")
    assert log.read_text() == "prev\nreport\nafter\n" and log.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_a_symbolic_link_loop_is_in_the_way(tmp_path):
    """It was a RuntimeError traceback from the input check (`same_file`) before any work."""
    from nst.engine.files import same_file

    loop = tmp_path / "loop.png"
    loop.symlink_to(loop.name)
    assert in_the_way(loop) == f"{loop} is a symbolic link that leads back to itself"
    assert not same_file(loop, tmp_path / "other.png")
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to("missing.png")
    assert in_the_way(dangling) is None  # written through: the target is made
