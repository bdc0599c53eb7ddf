"""Why the twin cannot be written: its disk's state (full, read-only), which can change without the
mapper and is waited for, or something someone must fix. For the log, STATUS= and `<node>/health`."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

# Free space below this counts as a full disk (SQLite needs a few pages, the WAL index 32 KiB).
TWIN_DISK_FULL_BELOW = 1 << 20
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14


def _disk_of(path: Path) -> tuple[Path, bool, int] | None:
    """(the nearest existing directory of `path`, its file system read-only, bytes free to a user)."""
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return directory, bool(st.f_flag & os.ST_RDONLY), st.f_bavail * st.f_frsize


def _codes(exc: BaseException) -> tuple[set[int], set[int]]:
    """(the SQLite primary result codes, the errnos) along the exception's chain of causes."""
    codes: set[int] = set()
    errnos: set[int] = set()
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) is not None:
            codes.add(seen.sqlite_errorcode & 0xFF)
        if isinstance(seen, OSError) and seen.errno:
            errnos.add(seen.errno)
        seen = seen.__cause__
    return codes, errnos


def twin_disk_state(exc: BaseException, path: Path) -> tuple[str, Path, int | None] | None:
    """("read-only" or "full", the directory looked at, bytes free if known) when the error is the
    disk's state; None for the errors someone must fix (a corrupt file, not a database, a
    permission) and for a lock another process holds.

    SQLITE_FULL (and ENOSPC, EDQUOT, EROFS) say so; SQLITE_IOERR (a full tmpfs gives `disk I/O
    error` when the WAL index cannot grow), SQLITE_READONLY, SQLITE_CANTOPEN and EIO count only when
    the file system is read-only or full (statvfs): otherwise they are the file's or the directory's
    permissions, a file size limit or a failing card, which waiting does not cure."""
    codes, errnos = _codes(exc)
    disk = _disk_of(path)
    read_only = disk is not None and disk[1]
    full = disk is not None and disk[2] < TWIN_DISK_FULL_BELOW
    said_so = codes & {_SQLITE_FULL} or errnos & {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
    disk_error = codes & {_SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN} or errno.EIO in errnos
    if not (said_so or (disk_error and (read_only or full))):
        return None
    where = disk[0] if disk is not None else path.parent
    if read_only or errno.EROFS in errnos:
        return "read-only", where, disk[2] if disk is not None else None
    return "full", where, disk[2] if disk is not None else None


def twin_disk_problem(exc: BaseException, path: Path) -> str | None:
    """What keeps the twin from being opened or written when it is its disk's state (twin_disk_state),
    and what to do, for the log and STATUS=; None for the errors someone must fix: those stop the
    start at once."""
    state = twin_disk_state(exc, path)
    if state is None:
        return None
    kind, where, free = state
    if kind == "read-only":
        return (f"the file system of {where} is read-only: remount it read-write (mount -o remount,rw); one the kernel"
                " made read-only after write errors may be a failing SD card (see dmesg)")
    free_text = f"{free // 1024} KiB free" if free is not None else "free space unknown"
    return (f"the disk of {where} is full ({free_text}): free space there (old logs: journalctl --vacuum-size=50M,"
            " /var/log, /var/tmp)")


def twin_write_cause(exc: BaseException, path: Path) -> str:
    """A short name for why a twin commit failed, for `<prefix>/<node>/health`: "disk full",
    "read-only", "locked" (another process holds the twin's lock past twin.busy_timeout_ms) or
    "error" (anything else: the log says more)."""
    state = twin_disk_state(exc, path)
    if state is not None:
        return "read-only" if state[0] == "read-only" else "disk full"
    codes, _ = _codes(exc)
    if codes & {_SQLITE_BUSY, _SQLITE_LOCKED}:
        return "locked"
    return "error"


def innermost(exc: BaseException) -> BaseException:
    """The first cause of an exception's chain (what SQLite or the OS said)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def write_denied(path: Path) -> tuple[str, int] | None:
    """(`FILE is owner:group mode, which this user (NAME) may not write`, the owner's uid) for the
    twin file or its directory when this user may not write it (its mode, another owner, an
    immutable flag); None when both may be written. SQLite's "attempt to write a readonly
    database" names neither the file nor the cause."""
    import pwd

    from twin.store import described

    for candidate in (Path(path), Path(path).parent):
        if candidate.exists() and not os.access(candidate, os.W_OK):
            try:
                user = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:
                user = f"uid {os.geteuid()}"
            return f"{described(candidate)}, which this user ({user}) may not write", candidate.stat().st_uid
    return None


# SQLite's WAL write lock: one byte of the -shm file (WALINDEX_LOCK_OFFSET 120 + WAL_WRITE_LOCK 0),
# taken with a POSIX record lock (fcntl F_SETLK) by whoever writes: a `BEGIN IMMEDIATE` held open.
_WAL_WRITE_LOCK_BYTE = 120


def write_lock_pids(locks: str, device: int, inode: int, byte: int) -> list[int]:
    """The pids holding a write lock over `byte` of the file (`device`, `inode`: its st_dev, st_ino)
    in /proc/locks's text: POSIX and OFD record locks (an OFD lock's pid may be -1: left out), not
    the requests waiting for one (`->`). The same text on every architecture, unlike struct flock
    (F_GETLK), whose layout on 32-bit Linux (armv7l Raspberry Pi OS) is not 64-bit Linux's.

        1: POSIX  ADVISORY  WRITE 1234 b3:02:131075 120 120"""
    pids: list[int] = []
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] == "->" or fields[1] not in ("POSIX", "OFDLCK") or fields[3] != "WRITE":
            continue
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(":")
            start, end = int(fields[6]), (None if fields[7] == "EOF" else int(fields[7]))
            same_file = (int(major, 16), int(minor, 16), int(ino)) == (os.major(device), os.minor(device), inode)
        except ValueError:
            continue
        if same_file and pid > 0 and start <= byte and (end is None or byte <= end):
            pids.append(pid)
    return pids


def lock_holder(path: Path) -> str | None:
    """`pid 1234 (sqlite3 /var/lib/mapper/twin.db)`: the process holding the twin's write lock, as
    the kernel tells (/proc/locks: a write lock on the -shm file's write-lock byte); None when it
    cannot say (no lock held now, a holder in this very process, no /proc/locks)."""
    try:
        shm = os.stat(f"{path}-shm")
        with open("/proc/locks") as locks:
            text = locks.read()
    except OSError:
        return None
    pids = [pid for pid in write_lock_pids(text, shm.st_dev, shm.st_ino, _WAL_WRITE_LOCK_BYTE) if pid != os.getpid()]
    if not pids:
        return None
    pid = pids[0]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read(300).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def lock_note(path: Path) -> str:
    """What to say about the twin's write lock held by another process: who holds it, if known,
    and what to do."""
    holder = lock_holder(path)
    if holder:
        return (f"another process holds the twin's write lock: {holder}; it is waited for (an sqlite3 shell left in a"
                " transaction lets go at its COMMIT or ROLLBACK)")
    return ("another process holds the twin's write lock (a backup, a `mapper twin` command, an sqlite3 shell left in"
            " a transaction?); it is waited for")
