"""A watcher that runs beside a block of work on a second connection, and stops when the block ends."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self


class Background:
    """Run ``self._run()`` as a task while the ``async with`` block runs; cancel it after.

    What the watcher found stays on it; its own failure never hides the block's outcome.
    """

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        """Watch until cancelled (subclasses)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
