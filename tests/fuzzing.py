"""Damage that the fuzz tests do to a file's bytes, drawn through hypothesis (`draw` is `data.draw` or a composite's)."""

from __future__ import annotations

from hypothesis import strategies as st


def truncated(draw, blob: bytes) -> bytes:
    """`blob` cut short: at least its last byte missing."""
    return bytes(blob[: draw(st.integers(0, len(blob) - 1))])


def bit_flipped(draw, blob: bytes, max_flips: int, within: int | None = None) -> bytes:
    """`blob` with 1 to `max_flips` single bits flipped, in its first `within` bytes (default: anywhere)."""
    damaged = bytearray(blob)
    span = len(damaged) if within is None else min(len(damaged), within)
    for _ in range(draw(st.integers(1, max_flips))):
        damaged[draw(st.integers(0, span - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(damaged)
