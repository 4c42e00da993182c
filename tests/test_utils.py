"""Shared helpers: atomic writes keep the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

from i3cl_core.utils import atomic_write_json, atomic_write_text


def test_atomic_write_leaves_the_mode_a_plain_write_gives(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        new = atomic_write_json(tmp_path / "new.json", {"a": 1})
        assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
        os.umask(0o002)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "group.txt", "y").stat().st_mode) == 0o664
    finally:
        os.umask(old)
    # a file that exists keeps its own permissions, as open(path, "w") keeps them
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group.txt", "kept.txt", "new.json", "plain.txt"]
