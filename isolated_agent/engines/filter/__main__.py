"""`python -m isolated_agent.engines.filter ROOT RUN_DIR LOG READY_FD [--on-demand]`: the filter
daemon's own process, started by `daemon.start_background` (not a command for users: they run
`agentctl filter start`)."""

import sys

from isolated_agent.engines.filter.daemon import daemon_main

if __name__ == "__main__":
    root, run_dir, log_path, ready_fd = sys.argv[1:5]
    daemon_main(root, run_dir, log_path, int(ready_fd), "--on-demand" in sys.argv[5:])
