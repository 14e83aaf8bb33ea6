"""The flags every TCP listener of the server is opened with (c2s, s2s, components, HTTP).

``presenced serve --workers N`` runs N processes of one machine behind the same ports: each
worker calls ``share_ports()`` before its server starts, and its listeners then set SO_REUSEPORT
(the kernel spreads new connections over the processes). A process of its own keeps the port to
itself: a second server started by mistake on the same address fails with "address in use"
instead of silently taking half of the connections.
"""

from __future__ import annotations

_shared = False


def share_ports() -> None:
    """This process is one of several workers behind the same listening ports."""
    global _shared
    _shared = True


def ports_shared() -> bool:
    """reuse_port of every listener (loop.create_server, aiohttp's TCPSite)."""
    return _shared


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; (before, after).

    Every connection is a file descriptor and the soft limit is often 1024 (systemd's default
    for services, and most shells'), which a busy server meets long before memory or CPU. The
    hard limit is what the administrator allows (LimitNOFILE= in the unit, limits.conf);
    raising the soft limit up to it needs no privilege (setrlimit(2))."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit is refused as a soft one beyond fs.nr_open: take that.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                wanted = int(f.read())
        except (OSError, ValueError):
            wanted = 1 << 20
    else:
        wanted = hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft
