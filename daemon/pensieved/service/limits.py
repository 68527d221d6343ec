"""The daemon's open-file limit: raised at start, as launchd leaves it at 256.

Every connection, model file, log and `psutil` read takes a file
descriptor. launchd starts an agent with a soft limit of 256 (systemd with
1024); a local process that keeps reconnecting could hold them all and
starve a model load or the log's rotation. The soft limit is raised to the
hard one, up to `OPEN_FILES`; the plist asks launchd for the same
(units.py), and this covers a daemon started any other way.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# macOS's OPEN_MAX (and its default kern.maxfilesperproc): setrlimit refuses
# more there. Far above what the daemon uses anywhere (64 connections at once).
OPEN_FILES = 10240


def raise_open_files(wanted: int = OPEN_FILES) -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one, up to `wanted`; (before, after).

    Never lowers it, and never touches the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft
