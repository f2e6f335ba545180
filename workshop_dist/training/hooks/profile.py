"""A ``jax.profiler`` trace of the steps in ``cadence.profile_steps: [first, count]`` into ``WORKDIR/profile``."""

from __future__ import annotations

import logging
from typing import Any

import jax

from workshop_dist import storage

log = logging.getLogger("workshop_dist")


class ProfileHook:
    """Starts the trace after step ``first`` and stops it after step ``first + count``, at step boundaries."""

    kind = "profile"

    def __init__(self, directory: storage.AnyPath, first: int, count: int):
        self.directory, self.marks = directory, (first, first + count)

    def next_step(self, step: int) -> int | None:
        return next((mark for mark in self.marks if mark > step), None)

    def __call__(self, info: Any) -> None:
        jax.block_until_ready(info.state.step)  # the loop has read every metric: the device is idle
        if info.step == self.marks[0]:
            jax.profiler.start_trace(str(self.directory))
            log.info("Profiling steps %d-%d into %s", info.step + 1, self.marks[1], self.directory)
        elif info.step == self.marks[1]:
            jax.profiler.stop_trace()
            log.info("Profile written to %s (open with TensorBoard's profile plugin or XProf)", self.directory)
