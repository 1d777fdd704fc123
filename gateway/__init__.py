"""Sluice: a continuous, event-driven runtime for edge/IoT gateways."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
