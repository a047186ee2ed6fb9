"""Keep freed memory in the process during CPU training.

glibc returns blocks above its mmap threshold (and a large free top of the
heap) to the kernel on ``free``. A PPO update allocates and frees [minibatch,
hidden] activations of 16 MB dozens of times per minibatch, so each one was
mapped and zero-filled by the kernel again: about a tenth of a CPU update.
Raising both thresholds lets those blocks be reused; the price is that the
process keeps its peak heap, which a training task holds anyway.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not fresh mappings. Some glibc builds refuse more
# than half their heap size (32 MiB); that still covers a [65536, 64] float32 activation.
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 512 << 20  # free heap kept before returning memory to the kernel

_tuned = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        logger.info("allocator thresholds left at glibc defaults: %s", error)
        return False
    # Only with the mmap threshold set: a trim threshold alone switches off glibc's own adaptive
    # threshold and is slower than the defaults.
    if any(libc.mallopt(_M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS):
        _tuned = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
