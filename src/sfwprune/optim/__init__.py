"""The SFW optimizer: :class:`SFW` and its dispatcher (sfw.py); the three implementations of
the step: the reference loop (_reference.py), the compiled CPU kernel (_cpu_kernel.py) and the
batched torch step (_batched.py)."""

from .sfw import RESCALES, SFW

__all__ = ["RESCALES", "SFW"]
