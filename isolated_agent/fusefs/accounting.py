"""How many requests of each kind a daemon answered, and the time its handlers took: the
benchmarks' "requests × cost per request" (benchmarks/README-guard.md, README-filter.md).

Off unless `$AGENTFS_REQUESTS` names a file when the daemon starts; then every handler of the
adapter is counted (`counted`), and the totals since the start are written to that file as
JSON — `{"getattr": [count, seconds], ...}` — at each SIGUSR2 and when the daemon ends, so a
benchmark can take them before and after one workload and subtract. The time is the
handler's own, from the request's arrival in Python to its answer: the kernel's and pyfuse3's
share of a round trip is the rest of the wall time.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

ENV = "AGENTFS_REQUESTS"
T = TypeVar("T")

_path = os.environ.get(ENV) or None
_totals: dict[str, list[float]] = {}


def enabled() -> bool:
    return _path is not None


def counted(operation: str, handler: Callable[..., Coroutine[Any, Any, T]]
            ) -> Callable[..., Coroutine[Any, Any, T]]:
    """`handler`, counted under `operation` when accounting is on (else `handler` itself)."""
    if _path is None:
        return handler
    total = _totals.setdefault(operation, [0, 0.0])

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> T:
        start = time.perf_counter()
        try:
            return await handler(*args)
        finally:
            total[0] += 1
            total[1] += time.perf_counter() - start

    return wrapper


def write() -> None:
    """Write the totals so far (atomically: a reader never sees half a file)."""
    if _path is None:
        return
    answered = {name: [int(count), seconds] for name, (count, seconds) in _totals.items()
                if count}
    temporary = f"{_path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(answered, f, sort_keys=True)
    os.replace(temporary, _path)
