"""QEMU test guest for the Linux kernel's NBD client (see guest.py)."""

from .guest import (
    COW_LENGTH,
    COW_OFFSET,
    GuestImage,
    GuestResult,
    GuestUnavailable,
    StepResult,
    build_guest,
    cow_pattern,
    run_guest,
    run_guest_steps,
)

__all__ = [
    "COW_LENGTH",
    "COW_OFFSET",
    "GuestImage",
    "GuestResult",
    "GuestUnavailable",
    "StepResult",
    "build_guest",
    "cow_pattern",
    "run_guest",
    "run_guest_steps",
]
