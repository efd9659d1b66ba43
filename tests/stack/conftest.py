"""The review tests' workspace (a real env, and the same workload run on a copy), for stacks."""

from tests.review.conftest import ws  # noqa: F401
