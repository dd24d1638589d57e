"""Exceptions raised by sals.

Every failure of the C library maps to one class by its ``sals_status_t``; the message is the
library's ``sals_last_error()``, which names the offending argument.
"""

from __future__ import annotations


class SalsError(Exception):
    """Base class of every sals error. ``status`` is the C status code (0 for Python-side checks
    that have no C counterpart)."""

    status = 0

    def __init__(self, message: str = "", status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgumentError(SalsError, ValueError):
    """A wrong shape, dtype, stride, device or value (SALS_ERR_INVALID_ARGUMENT)."""

    status = 1


class UnsupportedError(SalsError):
    """Valid, but not implemented for this device, dtype or size (SALS_ERR_UNSUPPORTED)."""

    status = 2


class OutOfMemoryError(SalsError, MemoryError):
    """A host or device allocation failed (SALS_ERR_OUT_OF_MEMORY)."""

    status = 3


class CapacityError(SalsError):
    """max_batch or max_tokens of a cache would be exceeded (SALS_ERR_CAPACITY)."""

    status = 4


class NotFiniteError(SalsError, ValueError):
    """An input holds NaN or infinity (SALS_ERR_NOT_FINITE)."""

    status = 5


class DeviceError(SalsError, RuntimeError):
    """A CUDA runtime error (SALS_ERR_DEVICE)."""

    status = 6


class CalibrationError(SalsError, ValueError):
    """A calibration file is corrupt, truncated, tampered with, of another format or version, or
    made for another model (fingerprint mismatch); or calibration input is unusable."""


_BY_STATUS = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        UnsupportedError,
        OutOfMemoryError,
        CapacityError,
        NotFiniteError,
        DeviceError,
    )
}


def _from_status(status: int, message: str) -> SalsError:
    """The exception for a C status (called by sals._C); unknown codes give a SalsError."""
    cls = _BY_STATUS.get(status, SalsError)
    return cls(message, status)
