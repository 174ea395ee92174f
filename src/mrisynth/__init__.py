"""mrisynth: synthesize a missing brain MRI sequence from the other three.

Heavy libraries (torch) are imported by the modules that need them, not here, so that
``import mrisynth`` and ``mrisynth --help`` stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"
