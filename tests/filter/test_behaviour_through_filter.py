"""DESIGN §5, item by item, for a job through the filter mount: agentfs's own behaviour tests,
collected here again with the filter's `fs` fixture (tests/filter/conftest.py)."""

from tests.agentfs import test_behaviour
from tests.agentfs.test_behaviour import *  # noqa: F403 - the same tests, another fixture

# Where the filter deliberately differs from the env mount. The kernel's caches are per mount,
# so the host and the env cannot share an inode once the env has changed a file: a copy-up gives
# the file the env's own inode number (the host keeps its own), and a descriptor opened
# read-only before the copy-up keeps reading the host's file (as with the kernel's overlayfs).
DIFFERENT_HERE = (
    "test_write_through_one_handle_is_read_through_another_opened_before_copy_up",
    "test_rename_of_lower_dir_keeps_open_files_and_inodes",
    "test_unknown_nodes_after_forget_stay_stable",
)
for _name in DIFFERENT_HERE:
    assert hasattr(test_behaviour, _name), f"{_name} is gone from the behaviour tests"
    del globals()[_name]
