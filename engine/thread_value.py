"""A value that a thread sets for the code it calls (the runner telling transformers' modules, which it
calls through their own signatures, how its batch is laid out); each row group's thread has its own."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class ThreadValue(Generic[T]):
    """``get()`` is the value the calling thread set with ``set`` around it, or None."""

    def __init__(self):
        self._local = threading.local()

    def get(self) -> T | None:
        return getattr(self._local, "value", None)

    @contextmanager
    def set(self, value: T | None) -> Iterator[None]:
        previous = self.get()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = previous
