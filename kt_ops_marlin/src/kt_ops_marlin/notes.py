"""How each device computes, in the words `kt rules explain` shows beside the operator (no torch needed)."""

from __future__ import annotations

DEVICE_NOTES: dict[str, str] = {"cuda": "int4, Triton kernel", "cpu": "int4, CPU path"}
"""Device type → note: ``KLinearMarlin (int4, CPU path)`` where a rule or ``--device-map`` puts it on the CPU."""
