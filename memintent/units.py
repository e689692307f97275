"""Parsing and printing of sizes, times and rates with their units."""

from __future__ import annotations

import re

from memintent.errors import MemintentError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, what: str = "size") -> int:
    """'24GiB' -> 25769803776; '1.5GB' -> 1500000000; a bare number is bytes."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _BYTE_UNITS:
        raise MemintentError(
            f"{what} {text!r} is not a size: write a number with a unit such as 24GiB, 512MiB, 80GB or 1048576")
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    if value <= 0:
        raise MemintentError(f"{what} {text!r} must be positive")
    return int(value)


def fmt_bytes(n: float) -> str:
    """Human size with binary units: 1.71 GiB."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_s(t: float | None) -> str:
    """Human time: 12.3 ms, 4.1 us, 1.25 s."""
    if t is None:
        return "-"
    a = abs(t)
    if a >= 1:
        return f"{t:.3f} s"
    if a >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    if a >= 1e-6:
        return f"{t * 1e6:.1f} us"
    return "0" if t == 0 else f"{t * 1e9:.0f} ns"


def parse_tokens(text: str) -> tuple[int, int]:
    """'4x512' -> (batch 4, seq 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise MemintentError(f"--tokens {text!r} is not BATCHxSEQ: write it like 4x512")
    return int(m.group(1)), int(m.group(2))


def round_s(t: float) -> float:
    """A predicted time kept to 12 significant digits (sub-picosecond for any step), so that the IR text shows
    ``0.00091064704 s`` rather than a sum's last-bit noise; the printed form still reads back exactly."""
    return float(f"{t:.12g}")
