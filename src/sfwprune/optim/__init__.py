"""The SFW optimizer."""

from .sfw import RESCALES, SFW

__all__ = ["RESCALES", "SFW"]
