"""What every part of the engine shares about its life: a closed engine refuses work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InferenceError

__all__ = ["Lifecycle"]


class Lifecycle:
    """``close()`` sets ``_closed``; the public methods call ``_check_open`` first. After close a
    generation used to run (loading its model again) and lose its record, and feedback or a
    report raised sqlite3's own error about a closed database."""

    _closed = False

    if TYPE_CHECKING:  # InferenceEngine's: hosted models' availability following their keys

        def _keys_fresh(self) -> None: ...

    def _check_open(self) -> None:
        if self._closed:
            raise InferenceError("this InferenceEngine is closed: make a new one to go on")
