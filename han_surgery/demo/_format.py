"""Section headings of the demo's output."""

from __future__ import annotations

__all__ = ["section"]


def section(title: str) -> None:
    """Print ``== title ====...`` (72 characters wide)."""
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))
