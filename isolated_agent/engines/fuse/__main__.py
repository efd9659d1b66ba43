"""agentfs as a standalone overlay filesystem, driven the way overlay test suites drive one:

    python -m isolated_agent.engines.fuse --lower L1:L2 --upper U --work W MOUNTPOINT
    agentfs [SOURCE] MOUNTPOINT -o lowerdir=L1:L2,upperdir=U,workdir=W[,allow_other]
    mount -t fuse.agentfs agentfs MOUNTPOINT -o lowerdir=...,upperdir=...,workdir=...

The last form goes through mount.fuse3, which runs the `agentfs` program with the second
form's arguments. Like fuse-overlayfs, the command returns once the mount is in place and a
daemon serves it; `-f` keeps it in the foreground. Lower lists use ':' (top first); '\\:' and
'\\,' escape a literal ':' or ','. Options of the kernel's overlayfs that do not apply
(userxattr, index=, redirect_dir=, metacopy=, xino=, ...) are accepted and ignored; generic
mount options are handed to libfuse. Exit status: 0 mounted, 1 could not mount, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from isolated_agent.engines.fuse.daemon import (
    MountConfig,
    MountFailed,
    open_layers,
    serve,
    setup_logging,
    start_background,
)
from isolated_agent.fusefs.cache import MODES

# Generic mount(8)/libfuse options accepted as they are.
_PASSED_TO_LIBFUSE = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
                      "noatime", "relatime", "strictatime", "nodiratime", "diratime", "async",
                      "sync", "dirsync", "auto_unmount"}
# The kernel overlayfs's own options: meaningless here, accepted so existing command lines work.
_IGNORED_PREFIXES = ("userxattr", "index=", "redirect_dir=", "metacopy=", "xino=", "nfs_export=",
                     "volatile", "uuid=", "verity=", "default_permissions", "_netdev",
                     "x-", "nofail")


class UsageProblem(Exception):
    pass


def split_escaped(text: str, separator: str) -> list[str]:
    """Split at `separator` unless it is escaped with a backslash; unescape the parts."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return split_escaped(text, "\0")[0]


def _raw_options(values: list[str]) -> list[str]:
    """-o a=1,b=2 -o c: split each at unescaped commas, keeping escapes for lowerdir's ':'."""
    result = []
    for value in values:
        current, escaped = [], False
        for char in value:
            if escaped:
                current.append("\\" + char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == ",":
                result.append("".join(current))
                current = []
            else:
                current.append(char)
        result.append("".join(current))
    return [r for r in result if r]


def parse(argv: list[str]) -> tuple[MountConfig, str, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="agentfs", description="agentfs: an overlay filesystem in user space (FUSE)."
    )
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    parser.add_argument("--lower", help="lower dirs, top first, separated by ':'")
    parser.add_argument("--upper")
    parser.add_argument("--work")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-f", "--foreground", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true", help="log every error in detail")
    parser.add_argument("--log", metavar="FILE", help="where a background daemon logs")
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        raise UsageProblem("give at most SOURCE and MOUNTPOINT")
    mountpoint = os.path.abspath(args.paths[-1])
    lowers = split_escaped(args.lower, ":") if args.lower else []
    upper, work = args.upper, args.work
    allow_other = False
    cache = MODES["exclusive"]
    fsname = "agentfs"
    fuse_options: list[str] = []
    for option in _raw_options(args.options):
        key, _, value = option.partition("=")
        if key == "lowerdir":
            lowers = split_escaped(value, ":")
        elif key == "upperdir":
            upper = _unescape(value)
        elif key == "workdir":
            work = _unescape(value)
        elif key == "allow_other":
            allow_other = True
        elif key == "cache":
            if value not in MODES:
                raise UsageProblem(f"cache={value}: choose one of {', '.join(MODES)}")
            cache = MODES[value]
        elif key == "fsname":
            fsname = value
        elif key == "debug":
            args.debug = True
        elif option in _PASSED_TO_LIBFUSE:
            fuse_options.append(option)
        elif option.startswith(_IGNORED_PREFIXES):
            continue
        else:
            raise UsageProblem(f"unknown option {option!r}")
    if not lowers or not all(lowers):
        raise UsageProblem("no lower dir: give --lower or -o lowerdir=")
    if not upper or not work:
        raise UsageProblem("agentfs needs an upper and a work dir (--upper/--work or -o)")
    config = MountConfig(
        lowers=[os.path.abspath(p) for p in lowers],
        upper=os.path.abspath(upper),
        work=os.path.abspath(work),
        allow_other=allow_other,
        cache=cache,
        fsname=fsname,
        fuse_options=fuse_options,
    )
    return config, mountpoint, args


def main(argv: list[str] | None = None) -> int:
    try:
        config, mountpoint, args = parse(sys.argv[1:] if argv is None else argv)
    except UsageProblem as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 2
    try:
        if args.foreground:
            setup_logging(args.debug)
            serve(open_layers(config), mountpoint, config)
        else:
            start_background(config, mountpoint, log_path=args.log, debug=args.debug)
    except MountFailed as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
