"""write_atomic: all or nothing, and the permissions a plain write would give."""

from __future__ import annotations

import stat

import pytest

from nst.engine.files import write_atomic


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
