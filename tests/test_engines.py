"""A local run's engines listen on loopback only (read from /proc: Linux, as CI is)."""

from __future__ import annotations

import os
from pathlib import Path


def _descendants(pid: int) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addresses.append(cols[1].split(":")[0][:width])
    return addresses


LOOPBACK_HEX = {
    "0100007F",  # 127.0.0.1
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


def test_local_ray_listens_on_loopback_only(ray_local):
    """Every listening socket of the Ray processes this session started (GCS, raylet, object
    manager, workers) is bound to loopback, not to all interfaces."""
    addresses = _listening_addresses(_descendants(os.getpid()))
    assert addresses, "no listening socket found for this session's Ray processes"
    wide = sorted(set(addresses) - LOOPBACK_HEX)
    assert wide == [], f"Ray processes listening beyond loopback (hex addresses): {wide}"
