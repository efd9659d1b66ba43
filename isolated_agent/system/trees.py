"""Removing a directory tree whatever its modes."""

from __future__ import annotations

import os
import shutil
import stat


def remove_tree(path: str) -> None:
    """rm -rf that also gets through the mode-000 dirs overlayfs leaves in its work dir."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
        for dirpath, dirnames, _ in os.walk(path):  # top-down: chmod each dir before entering
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    os.chmod(sub, stat.S_IRWXU)
        shutil.rmtree(path)
    else:
        os.unlink(path)
