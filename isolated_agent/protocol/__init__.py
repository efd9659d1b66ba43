"""The control-port protocol shared by every daemon: frames, peer checks, server and client."""
