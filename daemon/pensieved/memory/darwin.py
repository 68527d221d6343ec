"""macOS memory readings, in-process: the kernel's pressure level and its page counts.

The pressure level is one `sysctlbyname` call, not a `sysctl` process: a fork
and exec every second from a process holding gigabytes of Metal buffers is
wasteful, and under launchd `/usr/sbin` is not on the agent's PATH, so the
command was never found there.

"Available" is counted as macOS counts it, from `host_statistics64`, not as
psutil does (free + inactive, psutil/_psosx.py): inactive pages include
dirty anonymous memory that must be compressed or swapped before it can be
handed out, and leave out file-backed pages on the active queue and purgeable
memory, which the kernel drops at once. Here available is

    free + file-backed (external) + purgeable pages

which is Activity Monitor's "physical memory − memory used" (used = app
memory (anonymous − purgeable) + wired + compressed), the figure ollama sizes
models against (discover/gpu_info_darwin.m). xnu's `free_count` already
includes the speculative pages (osfmk/kern/host.c, `vm_stats`), and so do the
file-backed ones, so the speculative pages are taken out of free once.

Every function takes its C entry points as arguments: on Linux, tests hand
in C-callable stand-ins with the same prototypes, so the ctypes marshalling
is exercised there; the numbers themselves need a Mac.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

# int sysctlbyname(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen)
SYSCTLBYNAME = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)
# mach_port_t mach_host_self(void)
MACH_HOST_SELF = ctypes.CFUNCTYPE(ctypes.c_uint32)
# kern_return_t host_statistics64(host_t, host_flavor_t, host_info64_t, mach_msg_type_number_t *)
HOST_STATISTICS64 = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
)

PRESSURE_SYSCTL = b"kern.memorystatus_vm_pressure_level"
HOST_VM_INFO64 = 4  # <mach/host_info.h>


class VmStatistics64(ctypes.Structure):
    """`struct vm_statistics64` (<mach/vm_statistics.h>) up to revision 1: 152 bytes."""

    _fields_ = [
        ("free_count", ctypes.c_uint32),
        ("active_count", ctypes.c_uint32),
        ("inactive_count", ctypes.c_uint32),
        ("wire_count", ctypes.c_uint32),
        ("zero_fill_count", ctypes.c_uint64),
        ("reactivations", ctypes.c_uint64),
        ("pageins", ctypes.c_uint64),
        ("pageouts", ctypes.c_uint64),
        ("faults", ctypes.c_uint64),
        ("cow_faults", ctypes.c_uint64),
        ("lookups", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("purges", ctypes.c_uint64),
        ("purgeable_count", ctypes.c_uint32),
        ("speculative_count", ctypes.c_uint32),
        ("decompressions", ctypes.c_uint64),
        ("compressions", ctypes.c_uint64),
        ("swapins", ctypes.c_uint64),
        ("swapouts", ctypes.c_uint64),
        ("compressor_page_count", ctypes.c_uint32),
        ("throttled_count", ctypes.c_uint32),
        ("external_page_count", ctypes.c_uint32),
        ("internal_page_count", ctypes.c_uint32),
        ("total_uncompressed_pages_in_compressor", ctypes.c_uint64),
    ]


# HOST_VM_INFO64_REV1_COUNT, in integer_t units. Asking for revision 1 works
# from OS X 10.9 on; later kernels fill what fits and say so in the count.
HOST_VM_INFO64_REV1_COUNT = ctypes.sizeof(VmStatistics64) // 4


@dataclass(frozen=True)
class PageCounts:
    """The page counts the available figure needs (vm_stat's names in comments)."""

    free: int  # "Pages free" + "Pages speculative" (xnu adds them)
    speculative: int  # "Pages speculative"
    external: int  # "File-backed pages"
    purgeable: int  # "Pages purgeable"
    page_size: int

    @property
    def available(self) -> int:
        """Bytes macOS can hand out without compressing or swapping anything."""
        truly_free = max(self.free - self.speculative, 0)
        return (truly_free + self.external + self.purgeable) * self.page_size


def libsystem() -> Any:
    """The C library of this process (libSystem on macOS)."""
    return ctypes.CDLL(None, use_errno=True)


def sysctl_int(name: bytes, sysctlbyname: Any) -> int:
    """An integer sysctl, read with one `sysctlbyname` call."""
    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if sysctlbyname(name, ctypes.addressof(value), ctypes.byref(size), None, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sysctlbyname({name.decode()}): {os.strerror(error)}")
    if size.value != ctypes.sizeof(value):
        raise ValueError(f"sysctl {name.decode()} is {size.value} bytes, not an int")
    return value.value


def page_counts(host: int, host_statistics64: Any, page_size: int) -> PageCounts:
    """The kernel's page counts, from one `host_statistics64(HOST_VM_INFO64)` call."""
    stats = VmStatistics64()
    count = ctypes.c_uint32(HOST_VM_INFO64_REV1_COUNT)
    result = host_statistics64(host, HOST_VM_INFO64, ctypes.addressof(stats), ctypes.byref(count))
    if result != 0:
        raise OSError(f"host_statistics64 failed: kern_return_t {result}")
    if count.value < HOST_VM_INFO64_REV1_COUNT:
        # An older kernel filled only revision 0, without the file-backed count.
        raise ValueError(f"host_statistics64 returned {count.value} of the fields needed")
    return PageCounts(
        free=stats.free_count,
        speculative=stats.speculative_count,
        external=stats.external_page_count,
        purgeable=stats.purgeable_count,
        page_size=page_size,
    )


class DarwinMemory:
    """The kernel's pressure level and available bytes, bound to libSystem once."""

    def __init__(
        self,
        sysctlbyname: Any = None,
        mach_host_self: Any = None,
        host_statistics64: Any = None,
        page_size: int | None = None,
    ) -> None:
        if sysctlbyname is None or mach_host_self is None or host_statistics64 is None:
            libc = libsystem()
            sysctlbyname = sysctlbyname or SYSCTLBYNAME(("sysctlbyname", libc))
            mach_host_self = mach_host_self or MACH_HOST_SELF(("mach_host_self", libc))
            host_statistics64 = host_statistics64 or HOST_STATISTICS64(("host_statistics64", libc))
        self._sysctlbyname = sysctlbyname
        self._host_statistics64 = host_statistics64
        # Each call adds a reference to the host port: take one and keep it.
        self._host = int(mach_host_self())
        self._page_size = page_size or os.sysconf("SC_PAGE_SIZE")

    def pressure_level(self) -> int:
        """`kern.memorystatus_vm_pressure_level`: 1 normal, 2 warn, 4 critical."""
        return sysctl_int(PRESSURE_SYSCTL, self._sysctlbyname)

    def page_counts(self) -> PageCounts:
        return page_counts(self._host, self._host_statistics64, self._page_size)
