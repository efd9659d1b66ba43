"""isolated-agent: run a program against your real project while its writes land in a private,
reviewable copy-on-write layer (an *env*).

Layout (see DESIGN §9): `cli` parses and prints; `env` is the store of envs; `overlay` is the
on-disk format; `engines` produce the merged view; `jobs` start and contain the process tree.
"""

__version__ = "0.1.0"
