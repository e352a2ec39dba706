"""Jetson platform layer: readings, power modes and the emulator, all through one root directory.

On a device the root is ``/``; ``emulated_root(board)`` lays out a fake one with fake tools on its PATH.
"""

from .board import BoardInfo
from .meminfo import MemInfo
from .platform import Platform
from .snapshot import CpuCore, Rail, Snapshot

__all__ = ["BoardInfo", "CpuCore", "MemInfo", "Platform", "PowerManager", "Rail", "Simulation", "Snapshot", "emulated_root"]


def __getattr__(name):
    if name == "emulated_root":
        from .emulator import emulated_root

        return emulated_root
    if name == "PowerManager":
        from .power import PowerManager

        return PowerManager
    if name == "Simulation":
        from .simulation import Simulation

        return Simulation
    raise AttributeError(name)
