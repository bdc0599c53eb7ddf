"""`mapper run` refuses a twin another local user could write, and a symbolic link in place of its lock.

What is in the twin is what the mapper acts on: it publishes the outbox's rows with its broker login
and applies the desired values to the devices. A twin that another user owns, or can write (the file,
its -wal or -shm file, or its directory: /tmp, even sticky, lets anyone create the -wal before the
mapper does) let that user publish anything as the mapper: `sudo MAPPER_TWIN__PATH=/tmp/mapper-twin.db
mapper run` (docs/raspberry-pi.md) published an outbox row `nobody` had queued in a 0666 twin it had
made there beforehand. Real SQLite files and real `python -m mapper run` processes; a plain TCP
listener stands for the broker, to tell whether the mapper got as far as connecting."""

from __future__ import annotations

import os
import select
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_config, write_devices
from twin.store import TwinStore

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
# What `nobody` queued in the repro: a twin update for a device of another namespace, power on.
FORGED_TOPIC = "$hw/events/device/secret/vault/twin/update"
FORGED_PAYLOAD = b'{"twin":{"power":{"expected":{"value":"true"}}}}'

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to chown a file to another user)")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """Where the config's broker is: a listening socket nobody answers on, to see whether the mapper connects."""
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def connected(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def forged_twin(directory: Path) -> Path:
    """A twin made by `mapper run`'s own code, with a row queued in its outbox behind the mapper's back."""
    twin = directory / "twin.db"
    TwinStore.open(twin).close()
    with sqlite3.connect(twin) as conn:
        conn.execute("INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts) VALUES (?, ?, ?, 1, 0,"
                     " 'event', 0)", (10_000, FORGED_TOPIC, FORGED_PAYLOAD))
    conn.close()
    return twin


def queued(twin: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{twin}?mode=ro", uri=True)
    try:
        return [topic for (topic,) in conn.execute("SELECT topic FROM outbox")]
    finally:
        conn.close()


def run_mapper(config: Path, *, within_s: float = 30) -> subprocess.CompletedProcess[str]:
    """`mapper run` that must stop by itself (refused); one still running is killed and fails the test."""
    proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"mapper run was not refused: still running after {within_s} s\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _other_users_file(twin: Path) -> Path:
    os.chown(twin, NOBODY, NOBODY)
    return twin


def _world_writable_file(twin: Path) -> Path:
    twin.chmod(0o666)
    return twin


def _other_users_wal(twin: Path) -> Path:
    wal = Path(f"{twin}-wal")  # made before the mapper's first start: SQLite would take its frames as the twin's
    wal.write_bytes(b"")
    os.chown(wal, NOBODY, NOBODY)
    return wal


def _sticky_world_writable_directory(twin: Path) -> Path:
    twin.parent.chmod(0o1777)  # as /tmp
    return twin.parent


@pytest.mark.parametrize("make_foreign", [
    pytest.param(_other_users_file, marks=root_only, id="file-owned-by-nobody"),
    pytest.param(_world_writable_file, id="file-0666"),
    pytest.param(_other_users_wal, marks=root_only, id="wal-owned-by-nobody"),
    pytest.param(_sticky_world_writable_directory, id="directory-1777"),
])
def test_mapper_run_refuses_a_twin_another_user_can_write_before_connecting(
        tmp_path: Path, listener: socket.socket, make_foreign) -> None:  # noqa: ANN001
    """Refused at start, naming the twin and the file or directory at fault with what to do; the
    mapper never connects to the broker, the forged row stays queued, and no lock file is left
    beside the twin. The same twin made the mapper's own again runs (and connects): the check is
    what stops it."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    twin = forged_twin(shared)
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    port = listener.getsockname()[1]
    config = write_config(tmp_path / "mapper.yaml", devices, twin,
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:{port}\n  reconnect_min_s: 0.2\n")
    at_fault = make_foreign(twin)

    done = run_mapper(config)

    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: refusing the twin {twin}: {at_fault} is "), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert ("chmod 600" in done.stderr or "chown" in done.stderr or "mkdir -m 700" in done.stderr), done.stderr
    assert not connected(listener, 0), "the mapper connected to the broker"
    assert queued(twin) == [FORGED_TOPIC]
    assert not Path(f"{twin}.lock").exists()

    # Control: the same setup with the twin the mapper's own (this user's, 0600, in a 0755 directory) starts.
    shared.chmod(0o755)
    # (-shm: made by root's read in `queued`, and given the twin's owner by SQLite, as it does for root)
    for name in (twin, Path(f"{twin}-wal"), Path(f"{twin}-shm")):
        if name.exists():
            os.chown(name, os.geteuid(), os.getegid())
            name.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = connected(listener, 30)
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert started, f"the mapper did not start on its own twin:\n{err}"


def test_a_twin_in_a_shared_sticky_directory_is_not_told_to_chmod_it(tmp_path: Path) -> None:
    """A twin in /tmp was refused with "`chmod go-w /tmp` if it is root's own": advice that would
    break every program using /tmp. A sticky directory every user may write is shared by design:
    only a directory of the mapper's own is advised."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    config = write_config(tmp_path / "mapper.yaml", devices, shared / "twin.db")
    done = run_mapper(config)
    assert done.returncode == 1 and done.stderr.startswith(f"error: refusing the twin {shared / 'twin.db'}: "), done
    assert "mkdir -m 700" in done.stderr and "chmod go-w" not in done.stderr, done.stderr


def test_the_twin_commands_still_read_a_twin_of_another_user(tmp_path: Path) -> None:
    """The service's twin belongs to `mapper` (0600, in /var/lib/mapper): root reads it with `mapper
    devices` and `mapper twin get`, which publish nothing and drive no device; they are not refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to chown a file to another user)")
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    twin = tmp_path / "twin.db"
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    TwinStore.open(twin).close()
    os.chown(twin, NOBODY, NOBODY)
    done = subprocess.run([sys.executable, "-m", "mapper", "devices", "--config", str(config), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refusing" not in done.stderr


@pytest.mark.parametrize("target", ["existing", "missing"])
def test_a_symbolic_link_in_place_of_the_lock_file_is_refused(tmp_path: Path, target: str) -> None:
    """`<twin>.lock` was opened with open("a+"), following a symbolic link: the mapper created the
    file it pointed to (as root, anywhere) or truncated it and wrote its pid there. It is now opened
    with O_NOFOLLOW, and `mapper run` stops with an error naming the link; what it points to is untouched."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    twin = tmp_path / "twin.db"
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    victim = tmp_path / "victim"
    if target == "existing":
        victim.write_text("keep me\n")
    lock = Path(f"{twin}.lock")
    lock.symlink_to(victim)

    done = run_mapper(config)

    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"error: the twin's lock file {lock} is a symbolic link (to {victim}), which the mapper"
                           f" does not follow: remove it (rm {lock}); `mapper run` makes the lock file itself\n")
    if target == "existing":
        assert victim.read_text() == "keep me\n"
    else:
        assert not victim.exists()
    assert lock.is_symlink()


def test_a_twin_path_that_is_a_symbolic_link_is_judged_by_the_link_s_directory_and_the_real_file(
        tmp_path: Path) -> None:
    """A twin moved to another disk and linked from twin.path runs (SQLite follows the link, its -wal
    and -shm are beside the real file): it was refused as "a symbolic link". The link's directory must
    pass the directory rule (only this user or root could have made the link), and the real file and
    its directory the file rules: a link to a twin in a directory everyone can write, or a link in such
    a directory, is refused, naming that directory."""
    from twin.store import ForeignTwin, check_owned

    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o700)
    exposed = open_dir / "twin.db"
    TwinStore.open(exposed).close()
    open_dir.chmod(0o1777)  # as /tmp
    real = safe / "twin.db"
    TwinStore.open(real).close()
    link = tmp_path / "link.db"
    link.symlink_to(real)
    check_owned(link)  # the link in a 0755-or-stricter directory of ours, the real twin ours: runs

    to_exposed = safe / "to-exposed.db"
    to_exposed.symlink_to(exposed)
    with pytest.raises(ForeignTwin, match=f"refusing the twin {to_exposed}: {open_dir} "):
        check_owned(to_exposed)

    planted = open_dir / "planted.db"
    planted.symlink_to(real)
    with pytest.raises(ForeignTwin, match=f"refusing the twin {planted}: {open_dir} "):
        check_owned(planted)


def test_a_directory_writable_by_the_user_s_private_group_only_is_not_refused(tmp_path: Path) -> None:
    """Debian and Ubuntu give every user a group of their own, and a umask of 002 there makes a
    directory made in a checkout 0775: refused as writable by "the users of group <user>", though only
    that user is in it. A directory writable by another group is still refused."""
    import grp
    import pwd

    from twin.store import ForeignTwin, _private_group, check_owned

    me = pwd.getpwuid(os.geteuid())
    if not _private_group(me.pw_gid, me.pw_uid):
        pytest.skip(f"{me.pw_name}'s primary group is shared here")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    TwinStore.open(state / "twin.db").close()
    state.chmod(0o770)
    check_owned(state / "twin.db")
    other = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != me.pw_gid), None)
    if other is None:
        pytest.skip("no other group")
    os.chown(state, -1, other)
    with pytest.raises(ForeignTwin, match="can create and replace files in it"):
        check_owned(state / "twin.db")
