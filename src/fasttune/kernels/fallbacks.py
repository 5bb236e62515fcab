"""No silent fallbacks: the one record of the slower paths the kernels take, and why."""
from __future__ import annotations

import logging


class Fallbacks:
    """The fused paths that failed in this process, and why: each failure is logged once, and the path is not
    tried again; and the slower paths taken for a reason that is not a failure, each logged once. One instance per
    kernel family (`scope` heads its log lines: kernels/attention.py, grouped_gemm.py, nf4_matmul.py)."""

    def __init__(self, scope: str, logger: logging.Logger):
        self.scope, self.log = scope, logger
        self.failed: dict[str, str] = {}
        self._said: set[str] = set()

    def usable(self, path: str) -> bool:
        return path not in self.failed

    def fail(self, path: str, reason: str) -> None:
        self.failed[path] = reason
        self.log.warning("%s: %s failed (%s); a slower path is used for the rest of this process", self.scope, path,
                         reason)

    def note(self, key: str, message: str) -> None:
        """Log `message` once per process: a slower path taken for a reason that is not a failure."""
        if key not in self._said:
            self._said.add(key)
            self.log.warning("%s: %s", self.scope, message)

    def reset(self) -> None:
        self.failed.clear()
        self._said.clear()
