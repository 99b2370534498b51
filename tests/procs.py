"""Processes and their sockets, read from /proc (Linux, as CI is): the trees and sessions tests start,
their listening addresses, and killing them by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

LOOPBACK_HEX = {
    "0100007F",  # 127.0.0.1
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


def _stats() -> dict[int, list[str]]:
    """Fields after the command name of every process's /proc/PID/stat (state, ppid, pgrp, session, ...)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            out[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return out


def descendants(pid: int) -> set[int]:
    parent = {p: int(fields[1]) for p, fields in _stats().items()}
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def session(sid: int) -> set[int]:
    """Live processes of session `sid` (a child started with start_new_session=True leads its own)."""
    return {p for p, fields in _stats().items() if int(fields[3]) == sid and fields[0] != "Z"}


def listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) of the TCP sockets in LISTEN state that
    these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
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


def readable_address(hex_address: str) -> str:
    """/proc/net/tcp's hex address as text: 0100007F -> 127.0.0.1 (other IPv6: the 32 hex digits)."""
    if len(hex_address) == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_address)))
    if hex_address.startswith("0000000000000000FFFF0000"):  # IPv4-mapped IPv6 (a JVM's sockets)
        return "::ffff:" + readable_address(hex_address[24:])
    return hex_address


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with start_new_session=True and every process of its session (its
    Ray and Spark processes included), then reap it.

    The child goes first: killed after its Ray processes, it could see them die and exit on its own
    (Ray's core worker ends a driver whose raylet is gone with exit 1), which is not a kill."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    for _ in range(3):  # a process forked while the others die is caught by the next pass
        pids = session(proc.pid) | descendants(proc.pid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
