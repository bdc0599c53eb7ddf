"""`mapper install-service`: the unit rendered from the packaged template, checked by systemd-analyze where it exists."""

from __future__ import annotations

import logging
import grp
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_config, write_devices
from mapper.cli import main
from mapper.config import load_config
from mapper.systemd import (SERVICE_TWIN, UnitSettings, install_service, render_unit, service_warnings,
                            systemd_quote, writable_dirs)

ANALYZE = shutil.which("systemd-analyze")
REPO = Path(__file__).resolve().parents[1]


def unit_lines(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line and not line.startswith("#")]


def _open_to_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can enter, for checks of what the service user can reach (the tests
    run as root, so modes are checked, not tried; pytest's own tmp_path lies in a 0700 directory).
    Outside /tmp and /var/tmp, which the unit's PrivateTmp=yes hides (a warning of its own): under the
    home directory when others can enter it, else under /var/lib (root's home is usually 0700)."""
    parent = next((d for d in (Path.home(), Path("/var/lib")) if d.is_dir() and _open_to_others(d)
                   and os.access(d, os.W_OK)), None)
    if parent is None:
        pytest.skip("no directory outside /tmp that other users can enter and this user can write")
    path = Path(tempfile.mkdtemp(prefix="mapper-service-test-", dir=parent))
    try:
        path.chmod(0o755)
        assert not str(path.resolve()).startswith(("/tmp/", "/var/tmp/")), path
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    devices = write_devices(tmp_path / "dev", ["a"])
    return write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_dry_run_prints_unit_for_this_interpreter_and_config(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--dry-run prints a unit whose ExecStart runs this Python on the given config, and changes nothing."""
    # What a real install changes: the unit file (and its directory), the service user and its
    # groups (useradd, usermod), systemd (daemon-reload). The commands are caught, not run: a
    # dry run that went wrong must not change this host either.
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: commands.append(cmd))
    unit_file = tmp_path / "systemd" / "mapper.service"
    user_before = user_exists("mapper")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--groups", "--unit-file", str(unit_file)]) == 0
    assert not unit_file.exists() and not unit_file.parent.exists()
    assert commands == []
    assert user_exists("mapper") == user_before
    lines = unit_lines(capsys.readouterr().out)
    assert f"ExecStart={sys.executable} -m mapper run --config {config.resolve()}" in lines
    assert f"ExecStartPre=-{sys.executable} -m mapper.precompile --config {config.resolve()}" in lines
    # Waits for the reload's outcome (`systemctl reload` fails when it was refused), not a bare kill -HUP.
    assert f"ExecReload={sys.executable} -m mapper reload --config {config.resolve()}" in lines
    for expected in ("Type=notify", "WatchdogSec=30", "User=mapper", "StateDirectory=mapper",
                     "ReadWritePaths=/var/lib/mapper", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     "PrivateTmp=yes", "Restart=on-failure", "StartLimitIntervalSec=0", "TimeoutStopSec=30",
                     "Environment=MAPPER_TWIN__PATH=/var/lib/mapper/twin.db",
                     "Environment=PYTHONOPTIMIZE=2", "Environment=MALLOC_ARENA_MAX=2",
                     "Environment=PYTHONNODEBUGRANGES=1",
                     "Environment=PYTHONPYCACHEPREFIX=/var/lib/mapper/pycache"):
        assert expected in lines, expected


def test_the_units_environment_keeps_no_column_positions_in_loaded_code() -> None:
    """The unit's tuning (SERVICE_TUNING) includes PYTHONNODEBUGRANGES: code objects keep their
    line table without the column ranges (only traceback carets use them), for modules loaded
    from bytecode compiled with them too; -0.36 MiB of RSS for the Pi workload with onnxruntime."""
    from mapper.systemd import SERVICE_TUNING

    probe = ("import json.decoder, sys; code = json.decoder.JSONDecoder.decode.__code__;"
             "print(sys.flags.optimize, {col for _, _, col, _ in code.co_positions()})")
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONNODEBUGRANGES"})
    tuned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **SERVICE_TUNING})
    assert plain.stdout.split(" ", 1)[1].strip() != "{None}", plain  # columns there without it
    assert tuned.stdout.strip() == "2 {None}", tuned


def test_dry_run_says_it_would_create_the_missing_user(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user's first `--dry-run`, before the `mapper` user exists: the install creates it, so
    the dry run says so, with each command it would run, and runs none of them."""
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: commands.append(cmd))
    user = "mapper-test-nonexistent"
    unit_file = tmp_path / "systemd" / "mapper.service"
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", user,
                 "--groups", "daemon", "--unit-file", str(unit_file)]) == 0
    assert commands == [] and not user_exists(user) and not unit_file.parent.exists()
    err = capsys.readouterr().err.splitlines()
    assert err[:4] == [
        f"would create system user {user!r}: useradd --system --user-group --home-dir /var/lib/mapper"
        f" --no-create-home --shell /usr/sbin/nologin {user}",
        f"would add {user!r} to group 'daemon': usermod --append --groups daemon {user}",
        f"would write {unit_file}",
        "would reload systemd: systemctl daemon-reload"]
    # A user that exists is not created again.
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody",
                 "--groups", "--unit-file", str(unit_file)]) == 0
    assert capsys.readouterr().err.splitlines()[:2] == [f"would write {unit_file}",
                                                        "would reload systemd: systemctl daemon-reload"]


def test_the_units_group_is_the_users_primary_group(config: Path) -> None:
    """`--user nobody` rendered `Group=nobody`, a group Debian does not have (nobody's primary group
    is nogroup): systemd would fail the service with 216/GROUP, and the unreadable-file hint said
    `sudo chgrp nobody`. The unit's Group= is now an existing user's primary group; a user
    install-service creates (useradd --user-group) still gets its own name."""
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    if group == "nobody":  # (Fedora): Debian's nogroup is the case at hand
        pytest.skip("nobody's primary group is named nobody here")
    lines = unit_lines(render_unit(UnitSettings(config=config, user="nobody", groups=())))
    assert ("User=nobody", f"Group={group}") == (lines[lines.index("User=nobody")], lines[lines.index("User=nobody") + 1])
    lines = unit_lines(render_unit(UnitSettings(config=config, user="mapper-test-nonexistent", groups=())))
    assert "Group=mapper-test-nonexistent" in lines


def _root_only_password(tmp_path: Path, open_dir: Path) -> tuple[Path, Path]:
    """A password file only root reads (0600, root's), and a config naming it: (file, config)."""
    password = open_dir / "mqtt.password"
    password.write_text("secret\n")
    password.chmod(0o600)
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {password}\n")
    return password, config


def test_the_unreadable_file_hint_names_the_users_primary_group(
        tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The hint for a password file the service user cannot read said `sudo chgrp nobody` for
    `--user nobody`, a group Debian does not have: it names the user's primary group (nogroup)."""
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    password, config = _root_only_password(tmp_path, open_dir)
    assert main(["install-service", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]) == 1
    assert f"sudo chgrp {group} {password} && sudo chmod g+r {password}" in capsys.readouterr().err


def read_write_paths(unit: str) -> list[str]:
    return [line for line in unit_lines(unit) if line.startswith("ReadWritePaths=")]


def test_kubeedge_mode_makes_the_socket_and_state_file_directories_writable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ProtectSystem=strict leaves only the state directory writable. In kubeedge mode the mapper
    binds its socket (through a private .dmi-* directory made beside it) and saves state_file
    elsewhere, so the unit makes those directories writable too; the default state file, beside
    the unit's twin, needs nothing. Standalone mode writes nowhere else."""
    devices = write_devices(tmp_path / "dev", ["a"])
    kube = ("mode: kubeedge\nkubeedge:\n  name: dht\n  protocol: dht\n"
            f"  socket: {tmp_path}/run kube/dht.sock\n  state_file: {tmp_path}/state/ke.json\n")
    config = write_config(tmp_path / "kube.yaml", devices, SERVICE_TWIN, extra=kube)
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--groups"]) == 0
    assert read_write_paths(capsys.readouterr().out) == [
        "ReadWritePaths=/var/lib/mapper", f'ReadWritePaths="{tmp_path}/run kube"', f"ReadWritePaths={tmp_path}/state"]

    config = write_config(tmp_path / "kube.yaml", devices, SERVICE_TWIN,
                          extra="mode: kubeedge\nkubeedge:\n  name: dht\n  protocol: dht\n")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--groups"]) == 0
    assert read_write_paths(capsys.readouterr().out) == ["ReadWritePaths=/var/lib/mapper",
                                                         "ReadWritePaths=/etc/kubeedge"]

    config = write_config(tmp_path / "plain.yaml", devices, SERVICE_TWIN)
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--groups"]) == 0
    assert read_write_paths(capsys.readouterr().out) == ["ReadWritePaths=/var/lib/mapper"]


def _kubeedge_in_a_root_only_dir(open_dir: Path) -> tuple[Path, str]:
    """(a root-owned 0755 directory, config lines putting the DMI socket in it and the state file
    in a directory that does not exist): two things a service user cannot start with."""
    root_only = open_dir / "kubeedge"
    root_only.mkdir()
    root_only.chmod(0o755)
    return root_only, (f"mode: kubeedge\nkubeedge:\n  name: dht\n  protocol: dht\n  socket: {root_only}/dht.sock\n"
                       f"  state_file: {open_dir}/missing/ke.json\n")


def test_install_warns_when_the_service_user_cannot_create_its_socket(tmp_path: Path, open_dir: Path) -> None:
    """A writable mount is not enough: the service user needs write permission in the socket's
    directory (a root-owned /etc/kubeedge refuses it), and systemd refuses a missing one."""
    devices = write_devices(tmp_path / "dev", ["a"])
    root_only, kube = _kubeedge_in_a_root_only_dir(open_dir)
    config = load_config(write_config(tmp_path / "kube.yaml", devices, tmp_path / "twin.db", extra=kube))
    settings = UnitSettings(config=tmp_path / "kube.yaml", user="nobody", groups=(),
                            writable=tuple(writable_dirs(config)))
    done = list(install_service(render_unit(settings), settings, tmp_path / "mapper.service", system=False))
    assert (f"warning: kubeedge.socket: 'nobody' cannot create files in {root_only} ({root_only} is root:root"
            " 0755), so the service cannot start: use a directory it owns (docs/kubeedge.md, As a systemd"
            " service)") in done, done
    assert (f"warning: kubeedge.state_file: {open_dir}/missing does not exist, and the service cannot start"
            " without it (ReadWritePaths=): create it, writable by 'nobody'") in done, done
    os.chown(root_only, pwd.getpwnam("nobody").pw_uid, -1)  # its own directory: no warning
    (open_dir / "missing").mkdir()
    os.chown(open_dir / "missing", pwd.getpwnam("nobody").pw_uid, -1)
    done = list(install_service(render_unit(settings), settings, tmp_path / "mapper.service", system=False))
    assert not [line for line in done if "kubeedge." in line], done


def test_install_warns_when_the_interpreter_a_venv_links_to_is_closed(tmp_path: Path, open_dir: Path) -> None:
    """A venv made from a pyenv Python in a 0700 home: the venv's own directories are open, but
    its python is a symlink into the home, which the service user cannot enter, so it cannot exec it."""
    home = open_dir / "home" / "pi"
    target = home / ".pyenv" / "versions" / "3.12.4" / "bin" / "python3.12"
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\n")
    target.chmod(0o755)
    (open_dir / "home").chmod(0o755)
    home.chmod(0o700)
    venv_python = open_dir / "opt" / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(target)
    config = open_dir / "mapper.yaml"
    config.write_text("node: pi\n")
    settings = UnitSettings(config=config, python=str(venv_python), user="nobody", groups=())
    done = list(install_service(render_unit(settings), settings, tmp_path / "mapper.service", system=False))
    assert [line for line in done if "closed" in line] == [
        f"warning: {home} is closed to other users, so 'nobody' cannot reach {target}, the interpreter"
        f" {venv_python} links to; move the installation (e.g. to /opt/mapper) or open that directory"]
    home.chmod(0o711)  # enterable: nothing to say
    done = list(install_service(render_unit(settings), settings, tmp_path / "mapper.service", system=False))
    assert not [line for line in done if "closed" in line], done


def test_install_warns_when_a_user_other_than_root_can_change_what_the_service_runs(
        tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/raspberry-pi.md chowned /opt/mapper to the login user, and the unit runs
    /opt/mapper/venv/bin/python: that user (or anything running as it) could change the code the
    service runs as `mapper` (gpio group, broker password), and root runs at the next `sudo
    .../mapper`. install-service (and --dry-run) now warns about an interpreter, the directories on
    its way, or a config that a user other than root can change, with the chown/chmod that fixes it."""
    opt = open_dir / "opt"
    venv_python = opt / "mapper" / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    for directory in (opt, opt / "mapper", opt / "mapper" / "venv", venv_python.parent):
        directory.chmod(0o755)
    devices = write_devices(open_dir / "dev", ["a"])
    config = write_config(open_dir / "mapper.yaml", devices, SERVICE_TWIN)
    config.chmod(0o644)
    settings = UnitSettings(config=config, python=str(venv_python), user="nobody", groups=())

    def changeable() -> list[str]:
        return [line for line in service_warnings(settings) if "can be changed by a user other than root" in line]

    assert changeable() == []  # all root's, 0755 and 0644
    daemon = grp.getgrnam("daemon").gr_gid
    os.chown(opt / "mapper", -1, daemon)
    (opt / "mapper").chmod(0o775)
    runs = ("the service runs it as 'nobody' (with its groups and the broker password it reads), as does root at a"
            " `sudo ... mapper`")
    assert changeable() == [
        f"warning: the interpreter {venv_python} can be changed by a user other than root: {opt / 'mapper'} is"
        f" root:daemon 0775 (writable by group daemon), and {runs}: sudo chown -R root {opt / 'mapper'} &&"
        f" sudo chmod -R go-w {opt / 'mapper'}"]
    (opt / "mapper").chmod(0o755)
    os.chown(opt / "mapper" / "venv", pwd.getpwnam("nobody").pw_uid, -1)  # as `chown "$(id -un):" /opt/mapper` did
    assert changeable() == [
        f"warning: the interpreter {venv_python} can be changed by a user other than root: {opt / 'mapper' / 'venv'}"
        f" is nobody:root 0755 (owned by nobody), and {runs}: sudo chown -R root {opt / 'mapper' / 'venv'} &&"
        f" sudo chmod -R go-w {opt / 'mapper' / 'venv'}"]
    os.chown(opt / "mapper" / "venv", 0, -1)
    config.chmod(0o666)
    assert changeable() == [
        f"warning: --config: {config} can be changed by a user other than root: {config} is root:root 0666 (writable"
        " by every user), and the service takes from it which broker to give its password to and which devices to"
        f" drive, as does root at a `sudo ... mapper`: sudo chown root {config} && sudo chmod go-w {config}"]
    # `install-service --dry-run` prints it (its interpreter: this one, root's).
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]) == 0
    assert f"warning: --config: {config} can be changed by a user other than root" in capsys.readouterr().err
    config.chmod(0o644)
    assert changeable() == []


def test_install_refuses_a_password_file_the_service_user_cannot_read(
        tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """install-service runs as root, which reads any file; the service user must read the password
    file itself: the owner, group and mode of the file and of the directories on the way decide.
    A user that does not exist yet will have only its own group and --groups (not root's)."""
    password, config = _root_only_password(tmp_path, open_dir)
    user = "mapper-test-nonexistent"
    install = ["install-service", "--force", "--config", str(config), "--dry-run", "--user", user, "--groups", "daemon"]
    assert main(install) == 1
    out = capsys.readouterr()
    assert out.out == ""  # no unit
    assert out.err == (
        f"error: {config}: mqtt.password_file: the service user {user!r} cannot read {password} ({password} is"
        f" root:root 0600): {user!r} does not exist yet, create it first (sudo useradd --system --user-group"
        f" --home-dir /var/lib/mapper --no-create-home --shell /usr/sbin/nologin {user}), then:"
        f" sudo chgrp {user} {password} && sudo chmod g+r {password}\n")
    password.chmod(0o640)  # root's group: still not the service's
    assert main(install) == 1
    assert f"({password} is root:root 0640)" in capsys.readouterr().err
    os.chown(password, -1, grp.getgrnam("daemon").gr_gid)  # a group the user is given: readable
    assert main(install) == 0
    assert "ExecStart=" in capsys.readouterr().out

    closed = open_dir / "private"
    closed.mkdir(mode=0o700)
    password.rename(closed / "mqtt.password")
    config.write_text(config.read_text().replace(str(password), str(closed / "mqtt.password")))
    assert main(install) == 1
    assert capsys.readouterr().err == (
        f"error: {config}: mqtt.password_file: the service user {user!r} cannot read {closed / 'mqtt.password'}"
        f" ({closed} is root:root 0700): open {closed} to it, or move the file (e.g. to /etc/mapper)\n")


def test_install_warns_that_password_env_must_be_added_to_the_service(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit sets no environment variable for the password: `mqtt.password_env` installs with a
    warning saying how to give the service that variable (`systemctl edit`), whether or not the
    installing shell has it (the variable belongs to the service's environment)."""
    monkeypatch.delenv("MAPPER_TEST_MQTT_PASSWORD", raising=False)
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra="mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n"
                                "  password_env: MAPPER_TEST_MQTT_PASSWORD\n")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--groups"]) == 0
    out = capsys.readouterr()
    assert "ExecStart=" in out.out
    # (The first line: after it, --dry-run's checks of this host, a venv in /root, a config in pytest's 0700 tmp.)
    assert out.err.splitlines()[0] == (
        "warning: mqtt.password_env: the unit does not set MAPPER_TEST_MQTT_PASSWORD: add it with"
        " `systemctl edit mapper` ([Service] EnvironmentFile= a root-only file holding"
        " MAPPER_TEST_MQTT_PASSWORD=...), or use mqtt.password_file; without it the service cannot log in")


def test_a_password_file_shared_through_an_acl_is_accepted(tmp_path: Path, open_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """root:root 0640, and a POSIX ACL entry that lets the service user read it (setfacl -m
    u:nobody:r): the mode bits alone would refuse it; the ACL decides, and it can read it."""
    import pwd
    import struct
    import subprocess

    password = open_dir / "mqtt.password"
    password.write_text("secret\n")
    password.chmod(0o640)
    undefined = 0xFFFFFFFF
    entries = ((0x01, 6, undefined), (0x02, 4, pwd.getpwnam("nobody").pw_uid), (0x04, 4, undefined),
               (0x10, 4, undefined), (0x20, 0, undefined))  # user::rw- user:nobody:r-- group::r-- mask::r-- other::---
    try:
        os.setxattr(password, "system.posix_acl_access",
                    struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
    except OSError:
        pytest.skip("this file system has no POSIX ACLs")
    assert subprocess.run(["cat", str(password)], user="nobody", capture_output=True).returncode == 0
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {password}\n")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]) == 0
    assert "ExecStart=" in capsys.readouterr().out


def test_install_refuses_an_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config that would not start is reported with FILE:LINE, and no unit is written."""
    bad = tmp_path / "mapper.yaml"
    bad.write_text("node: pi\ntwin:\n  synchronous: SOMETIMES\n")
    unit_file = tmp_path / "mapper.service"
    assert main(["install-service", "--config", str(bad), "--unit-file", str(unit_file), "--unit-only"]) == 1
    assert "mapper.yaml:3" in capsys.readouterr().err
    assert not unit_file.exists()


def test_unit_only_writes_the_file_and_says_so(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--unit-only writes the unit where asked and prints what it did."""
    unit_file = tmp_path / "units" / "mapper.service"
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--groups"]) == 0
    assert f"wrote {unit_file}" in capsys.readouterr().out
    assert "Type=notify" in unit_file.read_text()


def test_install_creates_user_and_reloads_systemd(config: Path, tmp_path: Path) -> None:
    """Without --unit-only: a missing user is created (system user, own group), groups added, daemon-reload run."""
    commands: list[list[str]] = []
    settings = UnitSettings(config=config, user="mapper-test-nonexistent", groups=("gpio",))
    unit_file = tmp_path / "mapper.service"
    done = list(install_service(render_unit(settings), settings, unit_file, run=commands.append))
    assert commands[0][:3] == ["useradd", "--system", "--user-group"]
    assert commands[0][-1] == "mapper-test-nonexistent"
    assert commands[1] == ["usermod", "--append", "--groups", "gpio", "mapper-test-nonexistent"]
    assert commands[2] == ["systemctl", "daemon-reload"]
    assert done[:4] == ["created system user 'mapper-test-nonexistent'",
                        "added 'mapper-test-nonexistent' to group 'gpio'", f"wrote {unit_file}",
                        "ran systemctl daemon-reload"]


def test_paths_with_spaces_and_percent_are_quoted(tmp_path: Path) -> None:
    """ExecStart words are escaped for systemd: spaces quoted, % and $ doubled."""
    assert systemd_quote("/opt/my mapper/conf.yaml") == '"/opt/my mapper/conf.yaml"'
    assert systemd_quote("/etc/100%/$HOME") == "/etc/100%%/$$HOME"
    unit = render_unit(UnitSettings(config=Path("/opt/my mapper/mapper.yaml"), python="/usr/bin/python3", groups=()))
    assert 'ExecStart=/usr/bin/python3 -m mapper run --config "/opt/my mapper/mapper.yaml"' in unit_lines(unit)


def _sections(unit: str) -> dict[str, dict[str, list[str]]]:
    """The unit's settings by section and key, each key's values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit_lines(unit):
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_the_unit_never_gives_up_restarting_the_mapper(config: Path) -> None:
    """StartLimitIntervalSec=300 with StartLimitBurst=5 gave up after 5 failed starts in 5 minutes: an
    unattended Pi's mapper stayed dead until someone ran `systemctl reset-failed` on site. The unit
    now has no start limit (StartLimitIntervalSec=0, in [Unit] where systemd reads it) and restarts
    every failure after a RestartSec long enough that a lasting error (a bad config file) does not
    make it start over and over (systemd 252 has no RestartSteps=); docs/raspberry-pi.md says the
    same values."""
    sections = _sections(render_unit(UnitSettings(config=config, groups=())))
    unit, service = sections["Unit"], sections["Service"]
    assert unit.get("StartLimitIntervalSec") == ["0"], unit
    assert not {"StartLimitBurst", "StartLimitInterval", "StartLimitAction"} & (unit.keys() | service.keys())
    assert service.get("Restart") == ["on-failure"]
    (restart_s,) = service["RestartSec"]
    assert 10 <= int(restart_s) <= 60, restart_s  # seconds: at most ~8,640 tries a day, back within a minute
    guide = (REPO / "docs" / "raspberry-pi.md").read_text()
    for said in ("`Restart=on-failure`", f"`RestartSec={restart_s}`", "`StartLimitIntervalSec=0`"):
        assert said in guide, said
    assert "at most 5 times in 5 minutes" not in guide


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_rendered_unit_passes_systemd_analyze_verify(config: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the generated unit (and rejects a broken one, so the check can fail)."""
    good = tmp_path / "mapper.service"
    good.write_text(render_unit(UnitSettings(config=config, groups=())))
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "mapper.service" not in result.stderr, result.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(good.read_text().replace("ExecStart=", "ExecStart=relative/python "))
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(broken)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 or "broken.service" in result.stderr


def test_precompile_never_blocks_a_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The unit's ExecStartPre: a config it cannot read is left to `mapper run` to report (exit 0, one line)."""
    from mapper.precompile import main as precompile

    bad = tmp_path / "mapper.yaml"
    bad.write_text("node: pi\ntwin:\n  synchronous: SOMETIMES\n")
    assert precompile(["--config", str(bad)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("mapper.precompile: stopped early (") and "synchronous" in err
    assert err.rstrip().endswith("`mapper run` compiles the rest")
    assert logging.root.manager.disable == logging.NOTSET  # it quiets logging only while it runs


def test_precompile_compiles_the_hardware_libraries_without_importing_them(tmp_path: Path) -> None:
    """A DHT device loads Blinka and adafruit_dht only when it opens; the unit's precompile compiles
    them (-OO, into the unit's cache) but does not import them: Blinka probes the board on import."""
    config = write_config(tmp_path / "mapper.yaml", REPO / "devices" / "examples" / "pi" / "room-sensor-dht.yaml",
                          tmp_path / "twin.db")
    cache = tmp_path / "pycache"
    probe = ("import sys; from mapper.precompile import main; main(['--config', sys.argv[1]]);"
             "print(sorted(m for m in ('board', 'adafruit_dht', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(config)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True,
                         env={**os.environ, "PYTHONOPTIMIZE": "2", "PYTHONPYCACHEPREFIX": str(cache),
                              "PYTHONDONTWRITEBYTECODE": ""})
    assert (out.stdout.strip(), out.stderr) == ("[]", "")
    compiled = {p.name.split(".")[0] for p in cache.rglob("*.opt-2.pyc")}
    assert {"board", "adafruit_dht", "digitalio", "device_loop", "dht"} <= compiled


def test_install_refuses_a_config_or_device_file_the_service_user_cannot_read(
        open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The service reads its config and device files as its own user: a root-owned 0600 config
    (`sudo tee` under umask 077, a `chmod 600` for safety) or device file, or a device directory it
    cannot list, is refused by install-service, not left to fail at `systemctl start`."""
    devices = write_devices(open_dir / "dev", ["a"])
    device_file = next(devices.glob("*.yaml"))
    config = write_config(open_dir / "mapper.yaml", devices, SERVICE_TWIN)
    install = ["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]
    config.chmod(0o600)
    assert main(install) == 1
    out = capsys.readouterr()
    assert out.out == ""  # no unit
    assert out.err == (f"error: {config}: --config: the service user 'nobody' cannot read {config} ({config} is"
                       f" root:root 0600), so the service cannot start: sudo chmod o+r {config}\n")
    config.chmod(0o644)
    device_file.chmod(0o600)
    assert main(install) == 1
    assert capsys.readouterr().err == (
        f"error: {config}: devices: the service user 'nobody' cannot read {device_file} ({device_file} is"
        f" root:root 0600), so the service cannot start: sudo chmod o+r {device_file}\n")
    device_file.chmod(0o644)
    devices.chmod(0o700)
    assert main(install) == 1
    assert f"devices: the service user 'nobody' cannot read {devices} ({devices} is root:root 0700)" in (
        capsys.readouterr().err)
    devices.chmod(0o755)
    assert main(install) == 0
    assert "ExecStart=" in capsys.readouterr().out


def test_dry_run_reports_every_file_the_service_user_cannot_read_in_one_run(
        tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`install-service --dry-run` stopped at the first file the service user could not read: a 0600
    config, then (once fixed) a 0600 device file, then the password file, one run each. Every one is
    now said in one run, then exit 1; no unit. (--force: what this test machine lacks for a service, its
    interpreter under /root, is left out; without it that is listed too, after these.)"""
    password, _ = _root_only_password(tmp_path, open_dir)
    devices = write_devices(open_dir / "dev", ["a", "b"])
    device_files = sorted(devices.glob("*.yaml"))
    config = write_config(open_dir / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {password}\n")
    for path in (config, *device_files):
        path.chmod(0o600)
    install = ["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]
    assert main(install) == 1
    out, err = capsys.readouterr()
    assert out == "", out  # no unit
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    assert errors == [
        f"error: {config}: --config: the service user 'nobody' cannot read {config} ({config} is root:root 0600),"
        f" so the service cannot start: sudo chmod o+r {config}",
        *(f"error: {config}: devices: the service user 'nobody' cannot read {file} ({file} is root:root 0600), so"
          f" the service cannot start: sudo chmod o+r {file}" for file in device_files),
        f"error: {config}: mqtt.password_file: the service user 'nobody' cannot read {password} ({password} is"
        f" root:root 0600): sudo chgrp {group} {password} && sudo chmod g+r {password}"], err
    for path in (config, *device_files):
        path.chmod(0o644)
    os.chown(password, -1, pwd.getpwnam("nobody").pw_gid)
    password.chmod(0o640)
    assert main(install) == 0
    assert "ExecStart=" in capsys.readouterr().out


def test_dry_run_makes_the_checks_a_real_install_makes(
        tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/kubeedge.md and docs/raspberry-pi.md tell users to check the install with --dry-run: it
    makes the checks of the install (the mapper not installed for the interpreter, a directory the
    service user cannot enter, a ReadWritePaths= directory missing or closed to it), and changes
    nothing (no directory created, no unit written). What keeps the service from starting is an
    error, as for the install itself: listed on stderr after the unit, exit 1; with --force,
    warnings and exit 0."""
    import mapper.systemd

    monkeypatch.setattr(mapper.systemd, "_installed", lambda: False)
    devices = write_devices(open_dir / "dev", ["a"])
    root_only, kube = _kubeedge_in_a_root_only_dir(open_dir)
    config = write_config(tmp_path / "kube.yaml", devices, SERVICE_TWIN, extra=kube)  # tmp_path: 0700
    unit_file = tmp_path / "units" / "mapper.service"
    closed = next(p for p in reversed(config.resolve().parents) if not p.stat().st_mode & 0o001)
    cannot_start = [
        f"the mapper package is not installed for {sys.executable}, so the service cannot import it from"
        " /var/lib/mapper: run `pip install '.[pi]'` with that interpreter",
        f"{closed} is closed to other users, so 'nobody' cannot reach {config.resolve()}; move the installation"
        " (e.g. to /opt/mapper) or open that directory",
        f"kubeedge.socket: 'nobody' cannot create files in {root_only} ({root_only} is root:root 0755), so the"
        " service cannot start: use a directory it owns (docs/kubeedge.md, As a systemd service)",
        f"kubeedge.state_file: {open_dir}/missing does not exist, and the service cannot start without it"
        " (ReadWritePaths=): create it, writable by 'nobody'"]
    install = ["install-service", "--config", str(config), "--dry-run", "--user", "nobody", "--groups",
               "--unit-file", str(unit_file)]
    assert main(install) == 1
    out, err = capsys.readouterr()
    assert "ExecStart=" in out and "warning" not in out and "error" not in out
    lines = err.splitlines()
    header = ("error: the service could not start with this installation, so a real install refuses it: fix these,"
              " then run this again (or pass --force to install anyway):")
    assert header in lines, err
    listed = lines[lines.index(header) + 1:]
    for text in cannot_start:
        assert f"  - {text}" in listed, (text, err)
    assert not [line for line in lines if "cannot start" in line and line.startswith("warning")], err
    assert not (open_dir / "missing").exists() and not unit_file.parent.exists()

    assert main([*install, "--force"]) == 0
    out, err = capsys.readouterr()
    assert "ExecStart=" in out and "error" not in err
    for text in cannot_start:
        assert f"warning: {text}" in err.splitlines(), (text, err)
    assert not (open_dir / "missing").exists() and not unit_file.parent.exists()


def test_force_is_not_offered_past_an_error_it_does_not_override(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit that cannot start (its config under /tmp) and an error --force does not override (a
    twin.path that is not the service's) in one run: the summary said "(or pass --force to install
    anyway)", and with --force the install was refused all the same. The summary now says --force
    does not install past the errors above."""
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db")
    if not str(config.resolve()).startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    unit_file = tmp_path / "systemd" / "mapper.service"
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: commands.append(cmd))
    install = ["install-service", "--config", str(config), "--user", "nobody", "--groups", "--unit-file",
               str(unit_file)]
    assert main(install) == 1
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"error: {config.resolve()}: twin.path is ") for line in lines), lines
    assert ("error: the service could not start with this installation, so nothing was installed: fix these and the"
            " errors above, then run this again (--force installs past these, not past the errors above):") in lines
    assert not any("pass --force to install anyway" in line for line in lines), lines

    assert main([*install, "--force"]) == 1  # (as the summary said)
    assert commands == [] and not unit_file.parent.exists()


def test_install_refuses_a_unit_that_cannot_start_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A config and device files under /tmp (which the unit's PrivateTmp=yes hides from the service):
    `--dry-run` warned `the service cannot read it`, exit 0, and the install wrote the unit, ran
    `systemctl daemon-reload` and said `next: sudo systemctl enable --now mapper`. Now the install
    is refused, exit 1, listing what to fix, with nothing done: no user, no unit, no daemon-reload.
    --force installs it anyway (the problems as warnings), and does not say to enable it. As a user
    runs it (`--unit-only`, a real process), and in full, whose system commands (useradd, usermod,
    systemctl) are caught, not run."""
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN)
    if not str(config.resolve()).startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    unit_file = tmp_path / "systemd" / "mapper.service"
    hidden = ("is under /tmp, which the service does not see: the unit's PrivateTmp=yes gives it an empty /tmp and"
              " /var/tmp of its own, so the service cannot read it: move it out of /tmp and /var/tmp (e.g. to"
              " /etc/mapper)")
    install = ["install-service", "--config", str(config), "--user", "nobody", "--groups", "--unit-file",
               str(unit_file)]
    done = subprocess.run([sys.executable, "-m", "mapper", *install, "--unit-only"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done
    lines = done.stderr.splitlines()
    assert lines[lines.index("error: the service could not start with this installation, so nothing was installed:"
                             " fix these, then run this again (or pass --force to install anyway):") + 1:][-2:] == [
        f"  - --config: {config.resolve()} {hidden}", f"  - devices[0]: {devices} {hidden}"], done.stderr
    assert not unit_file.parent.exists()

    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: commands.append(cmd))
    assert main(install) == 1
    assert f"  - --config: {config.resolve()} {hidden}" in capsys.readouterr().err.splitlines()
    assert commands == [] and not unit_file.parent.exists()

    assert main([*install, "--force"]) == 0
    out, err = capsys.readouterr()
    assert commands == [["systemctl", "daemon-reload"]] and unit_file.is_file()
    assert f"warning: --config: {config.resolve()} {hidden}" in out.splitlines(), out
    assert out.splitlines()[-1] == "next: fix the problems in the warnings above: the service cannot start until then"
    assert "enable --now" not in out


def _inference_install(directory: Path, pipelines: str = "", temperature_map: str = "") -> Path:
    """A config in `directory` with the faulty room sensor (temperature and humidity, as sensor_faults
    reads them), `pipelines` as its `inference.pipelines` and `temperature_map` (YAML lines) as the
    sensor's temperature anomalyDetection map."""
    devices = directory / "dev"
    devices.mkdir(exist_ok=True)
    shutil.copy(REPO / "devices" / "examples" / "room-sensor.yaml", devices)
    faulty = (REPO / "examples" / "inference" / "room-sensor-faulty.yaml").read_text()
    if temperature_map:
        lines = "".join(f"            {line}\n" for line in temperature_map.splitlines())
        faulty = faulty.replace("      collectCycle: 250\n", "      collectCycle: 250\n      pushMethod:\n"
                                "        anomalyDetection:\n          data:\n" + lines, 1)
    (devices / "room-sensor-faulty.yaml").write_text(faulty)
    extra = f"inference:\n  pipelines:\n{pipelines}" if pipelines else ""
    return write_config(directory / "mapper.yaml", devices, SERVICE_TWIN, extra=extra)


def test_install_refuses_inference_pipelines_the_start_refuses(
        open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config pipeline naming a model that is not there, or a device file's anomalyDetection map doing
    so: `mapper run` refuses to start (inference.extension.config_problems), but install-service did not
    check it and installed a unit that then failed at `systemctl start`. It is now among what keeps the
    service from starting, each at its line (exit 1; with --force a warning); a right pipeline is not.
    (The interpreter this test runs may have problems of its own, such as a venv under /tmp: they are
    listed too.)"""
    install = ["install-service", "--config", str(open_dir / "mapper.yaml"), "--dry-run", "--user", "nobody",
               "--groups"]
    config = _inference_install(open_dir, "    - device: room-sensor-faulty\n      model: sensor_fault\n")
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "model: sensor_fault" in text)
    problem = f"{config}:{line}: inference.pipelines[0].model: no model 'sensor_fault'"
    assert main(install) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(text.startswith(f"  - {problem}") for text in err), err
    assert main([*install, "--force"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(text.startswith(f"warning: {problem}") for text in err), err

    _inference_install(open_dir, temperature_map="model: sensor_fault")
    device_file = open_dir / "dev" / "room-sensor-faulty.yaml"
    line = next(n for n, text in enumerate(device_file.read_text().splitlines(), 1) if "model: sensor_fault" in text)
    assert main(install) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(text.startswith(f"  - {device_file}:{line}: spec.properties[0].pushMethod.anomalyDetection.data.model:"
                               " no model 'sensor_fault'") for text in err), err

    _inference_install(open_dir, "    - device: room-sensor-faulty\n      model: sensor_faults\n")
    main(install)
    err = capsys.readouterr().err
    assert "sensor_fault" not in err and "inference" not in err, err

    # A device file the start refuses: listed as well (the pipelines cannot be checked without it).
    device_file.write_text(device_file.read_text().replace("collectCycle: 250", "collectCycle: -1", 1))
    line = next(n for n, text in enumerate(device_file.read_text().splitlines(), 1) if "collectCycle: -1" in text)
    assert main(install) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(text.startswith(f"  - {device_file}:{line}: spec.properties[0].collectCycle: must be >= 0")
               and text.endswith("(`mapper run` refuses the device files until it is fixed)") for text in err), err


def test_install_without_onnxruntime_says_what_it_cannot_check(open_dir: Path) -> None:
    """Without numpy and onnxruntime, install-service does not crash on a device file's anomalyDetection
    map: the map is not among what keeps the service from starting (the service runs without its
    pipeline, as `mapper run` does), and a warning says it was not checked and why. Config pipelines are
    refused, as the start refuses them."""
    from devices.extras import install_extra

    config = _inference_install(open_dir, temperature_map="model: sensor_faults")
    script = ("import sys\nsys.modules['onnxruntime'] = None\nsys.modules['numpy'] = None\n"
              "from mapper.cli import main\n"
              f"sys.exit(main(['install-service', '--config', {str(config)!r}, '--dry-run', '--user', 'nobody',"
              " '--groups']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    device_file = open_dir / "dev" / "room-sensor-faulty.yaml"
    line = next(n for n, text in enumerate(device_file.read_text().splitlines(), 1) if text.strip() == "data:")
    assert (f"warning: the anomalyDetection maps at {device_file}:{line} were not checked against their models, and"
            " the service runs without their pipelines: numpy and onnxruntime not installed here; install the `ml`"
            f" extra ({install_extra('ml')}) for them") in done.stderr.splitlines(), done.stderr

    _inference_install(open_dir, "    - device: room-sensor-faulty\n      model: sensor_faults\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "inference.pipelines: need numpy and onnxruntime, not installed here" in done.stderr, done.stderr


def test_install_warns_of_a_device_whose_drivers_library_is_not_installed(open_dir: Path) -> None:
    """`mapper validate --config` warned of a GPIO relay whose RPi.GPIO is not installed (`mapper run`
    starts it and it stays offline), but install-service's start checks said nothing and installed the
    unit. They now give the same warning (devices.loader.offline_warnings); it does not stop the install,
    as it does not stop `mapper run`."""
    site = open_dir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['RPi'] = None\nsys.modules['RPi.GPIO'] = None\n")
    devices = open_dir / "dev"
    devices.mkdir()
    (devices / "relay.yaml").write_text((REPO / "devices/examples/pi/relay-gpio.yaml").read_text())
    config = write_config(open_dir / "mapper.yaml", devices, SERVICE_TWIN)
    done = subprocess.run([sys.executable, "-m", "mapper", "install-service", "--config", str(config), "--dry-run",
                           "--user", "nobody", "--groups"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{site}:{REPO}"})
    assert "Traceback" not in done.stderr, done.stderr
    warned = [line for line in done.stderr.splitlines() if "would stay offline" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {devices / 'relay.yaml'}:"), done.stderr
    assert ("device default/fan-relay-pi would stay offline under `mapper run` (it cannot open): pins: rpi-gpio needs"
            " RPi.GPIO, not installed here: install the `pi` extra (") in warned[0], warned
    assert not any("would stay offline" in line for line in done.stderr.splitlines()
                   if line.startswith("  - ")), done.stderr  # (a warning: not among what stops the install)


def test_install_gives_the_1_wire_warnings_of_validate(open_dir: Path) -> None:
    """`mapper validate --config` warned of a ds18b20 device without a 1-wire bus and of a device on
    the pin config.txt's w1-gpio overlay holds, but install-service's start checks said nothing of
    them. The same function (devices.w1.host_warnings) gives them to both now, as warnings: they
    do not stop the install, as they do not stop `mapper run`."""
    devices = open_dir / "dev"
    devices.mkdir()
    no_bus = open_dir / "w1"  # (not there: the overlay not enabled)
    (devices / "probe.yaml").write_text((REPO / "devices/examples/pi/water-temperature-ds18b20.yaml").read_text()
                                        .replace("w1_dir: /sys/bus/w1/devices", f"w1_dir: {no_bus}"))
    (devices / "relay.yaml").write_text((REPO / "devices/examples/pi/relay-gpio.yaml").read_text()
                                        .replace("pins: rpi-gpio", "pins: fake").replace("pin: 17 ", "pin: 4 "))
    boot = open_dir / "config.txt"
    boot.write_text("dtoverlay=w1-gpio\n")  # GPIO4: the relay's
    config = write_config(open_dir / "mapper.yaml", devices, SERVICE_TWIN)
    env = {**os.environ, "MAPPER_BOOT_CONFIG": str(boot)}
    validated = subprocess.run([sys.executable, "-m", "mapper", "validate", "--config", str(config)], cwd=REPO,
                               capture_output=True, text=True, timeout=60, env=env)
    one_wire = [line for line in validated.stderr.splitlines() if "1-wire" in line]
    assert len(one_wire) == 2, validated.stderr
    assert one_wire[0].startswith(f"warning: {devices / 'probe.yaml'}:") and f"{no_bus} does not exist" in one_wire[0]
    assert one_wire[1].startswith(f"warning: {devices / 'relay.yaml'}:") and "GPIO4 is the 1-wire bus's" in one_wire[1]
    done = subprocess.run([sys.executable, "-m", "mapper", "install-service", "--config", str(config), "--dry-run",
                           "--user", "nobody", "--groups"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env)
    assert "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if "1-wire" in line] == one_wire, done.stderr


def test_install_refuses_a_config_whose_twin_is_not_the_services(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit keeps the service's twin in /var/lib/mapper/twin.db (MAPPER_TWIN__PATH), while the
    CLI commands a user runs with the same --config read the config's twin.path (by default
    mapper-twin.db beside the config): `mapper devices` said "not running" while the service ran,
    and `mapper twin set` wrote into a twin the service never reads. install-service refuses such a
    config (a dry run too), saying which line to put in it; --other-twin installs it anyway. An
    installing shell's MAPPER_TWIN__PATH is not the file's: neither the service nor the user's
    later commands have it."""
    monkeypatch.setenv("MAPPER_TWIN__PATH", "/var/lib/mapper/twin.db")
    devices = write_devices(tmp_path / "dev", ["a"])
    config = tmp_path / "mapper.yaml"
    config.write_text(f"node: pi\ndevices: [{devices}]\n")
    unit_file = tmp_path / "mapper.service"
    for extra in ((), ("--dry-run",)):
        assert main(["install-service", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                     "--groups", *extra]) == 1
        out, err = capsys.readouterr()
        first, *rest = err.splitlines()
        assert out == "" and first == (
            f"error: {config}: twin.path is {tmp_path}/mapper-twin.db, but the service keeps its twin in"
            f" /var/lib/mapper/twin.db (MAPPER_TWIN__PATH in the unit): `mapper devices` and `mapper twin get/set"
            f" --config {config}` would read and set another twin than the service's. Set twin.path in {config}:"
            " `twin: {path: /var/lib/mapper/twin.db}` (or `path: /var/lib/mapper/twin.db` in its `twin:` section),"
            " then run this again; or pass --other-twin to install anyway")
        # After it, in the same run, what else keeps the service from starting here (tmp_path is closed
        # to the service user), as a refused install lists it.
        assert not rest or (rest[0].startswith("error: the service could not start with this installation, so")
                            and all(line.startswith("  - ") for line in rest[1:])), err
        assert not unit_file.exists()
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--groups", "--other-twin"]) == 0
    assert unit_file.exists()
    config.write_text(f"node: pi\ndevices: [{devices}]\ntwin: {{path: /var/lib/mapper/twin.db}}\n")  # as told
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--groups"]) == 0


def test_validate_as_root_checks_the_twin_place_as_the_services_user(
        open_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`sudo mapper validate --config` checked the twin's place as root, whom modes do not stop: a twin
    directory only root can write passed, and the service, running as its User=, then could not make
    its twin; and a directory the service's user owns (as systemd's StateDirectory= leaves it) was
    refused as another user's. With an installed unit running this config on this twin, the checks are
    made as its user; when that user does not exist here, a warning says it cannot be told."""
    import mapper.systemd

    if os.geteuid() != 0:
        pytest.skip("root's view of the twin's place is what this checks")
    nobody = pwd.getpwnam("nobody")
    state = open_dir / "state"
    state.mkdir(mode=0o755)
    twin = state / "twin.db"
    config = write_config(open_dir / "mapper.yaml", write_devices(open_dir / "dev", ["a"]), twin)
    unit_file = open_dir / "mapper.service"
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--user", "nobody", "--groups", "--other-twin"]) == 0
    dropin = Path(f"{unit_file}.d")
    dropin.mkdir()
    (dropin / "twin.conf").write_text(f"[Service]\nEnvironment=MAPPER_TWIN__PATH={twin}\n")
    monkeypatch.setattr(mapper.systemd, "UNIT_FILE", unit_file)
    capsys.readouterr()
    user = f"the service's user (nobody, User= in {unit_file})"

    assert main(["validate", "--config", str(config)]) == 1  # root-only: root would pass, nobody cannot
    err = capsys.readouterr().err
    assert (f"{config}: twin.path: {state} is root:root 0755, which {user} may not write (its mode, or an immutable"
            " flag: lsattr): the service cannot make the twin, nor its -wal and -shm files, in it") in err, err

    os.chown(state, nobody.pw_uid, nobody.pw_gid)  # as StateDirectory= leaves it: nobody's
    assert main(["validate", "--config", str(config)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    twin.write_text("")
    twin.chmod(0o600)  # a twin root made (a `sudo mapper run` by hand): the service cannot open it
    assert main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: twin.path: refusing the twin {twin}: {twin} is root:root 0600, not nobody's" in err, err

    twin.unlink()
    os.chown(state, 0, 0)
    (dropin / "user.conf").write_text("[Service]\nUser=mapper-no-such-user\n")
    assert main(["validate", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {config}: twin.path: the mapper service ({unit_file}) runs this config as 'mapper-no-such-user'"
            f" (User=), which does not exist here: whether it can write its twin {twin} cannot be told") in err, err

    (dropin / "user.conf").write_text("[Service]\nUser=root\n")  # the service as root: root's view is the service's
    assert main(["validate", "--config", str(config)]) == 0
    assert "twin.path" not in capsys.readouterr().err


def test_lock_before_the_services_first_run_as_root_says_to_run_it_as_the_services_user(
        open_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`mapper lock` makes the twin when no `mapper run` has: as root, for a service that runs as
    another user, the twin would be root's, which the service refuses (not its own): it says to lock
    as the service's user, and makes nothing. As that user (or with no such service) it makes it."""
    import mapper.systemd

    if os.geteuid() != 0:
        pytest.skip("root locking for another user's service is what this checks")
    state = open_dir / "state"
    twin = state / "twin.db"
    config = write_config(open_dir / "mapper.yaml", write_devices(open_dir / "dev", ["a"]), twin)
    unit_file = open_dir / "mapper.service"
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--user", "nobody", "--groups", "--other-twin"]) == 0
    Path(f"{unit_file}.d").mkdir()
    Path(f"{unit_file}.d/twin.conf").write_text(f"[Service]\nEnvironment=MAPPER_TWIN__PATH={twin}\n")
    monkeypatch.setattr(mapper.systemd, "UNIT_FILE", unit_file)
    capsys.readouterr()
    assert main(["lock", "a", "--config", str(config)]) == 1
    assert capsys.readouterr().err == (
        f"error: no twin at {twin} yet (the service has not run): made by root, it would be root's, which the"
        f" service's user (nobody, User= in {unit_file}) cannot use; lock it as that user: sudo -u nobody mapper lock"
        f" ... --config {config}\n")
    assert not state.exists()

    Path(f"{unit_file}.d/user.conf").write_text("[Service]\nUser=root\n")  # a service run as root: root makes it
    assert main(["lock", "a", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("default/a is locked for maintenance since ")
    assert twin.stat().st_uid == 0


def test_the_twin_commands_say_when_the_service_runs_their_config_on_another_twin(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit installed with --other-twin (or before install-service refused it), or a twin.path
    edited since: `mapper devices`, `twin get`, `twin history` and `twin set` given the service's
    config warn that they read another twin than the service's, with the line that makes them one;
    `twin set` no longer says the next `mapper run` applies the value. A drop-in
    (`systemctl edit mapper`) setting MAPPER_TWIN__PATH counts; another config's unit does not."""
    import mapper.systemd
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    unit_file = tmp_path / "mapper.service"
    assert main(["install-service", "--force", "--config", str(config), "--unit-file", str(unit_file), "--unit-only",
                 "--groups", "--other-twin"]) == 0
    monkeypatch.setattr(mapper.systemd, "UNIT_FILE", unit_file)
    capsys.readouterr()
    warning = (f"warning: the mapper service ({unit_file}) runs {config} on the twin /var/lib/mapper/twin.db"
               f" (MAPPER_TWIN__PATH in the unit), but twin.path here is {tmp_path}/twin.db: this command reads and"
               f" sets {tmp_path}/twin.db, not the service's twin. Set `twin: {{path: /var/lib/mapper/twin.db}}` in"
               f" {config} (or run this with MAPPER_TWIN__PATH=/var/lib/mapper/twin.db)")
    for args in (("devices",), ("twin", "get", "lamp"), ("twin", "history", "lamp", "power")):
        main([*args, "--config", str(config)])
        assert warning in capsys.readouterr().err.splitlines(), args
    assert main(["twin", "set", "lamp", "power", "true", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [warning]
    assert out == (f"default/lamp/power: desired = true (version 1) in {tmp_path}/twin.db, which the mapper service"
                   " does not read (see the warning)\n")

    dropin = Path(f"{unit_file}.d")
    dropin.mkdir()
    (dropin / "override.conf").write_text(f"[Service]\nEnvironment=MAPPER_TWIN__PATH={tmp_path}/twin.db\n")
    assert main(["twin", "set", "lamp", "power", "false", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "no mapper is running on this twin: the next `mapper run` applies it" in out
    (dropin / "override.conf").unlink()
    other = write_config(tmp_path / "other.yaml", devices, tmp_path / "twin.db")
    assert main(["devices", "--config", str(other)]) == 0
    assert capsys.readouterr().err == ""


HARDENING = ("UMask=0077", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
             "SystemCallArchitectures=native", "RestrictNamespaces=yes", "ProtectHostname=yes",
             "ProtectKernelLogs=yes", "RestrictRealtime=yes", "LockPersonality=yes", "RemoveIPC=yes",
             "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectProc=invisible",
             "PrivateMounts=yes", "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged",
             "SystemCallErrorNumber=EPERM")
# Each can break GPIO, board detection or onnxruntime on some Pi (docs/raspberry-pi.md, Optional hardening);
# ProcSubset=pid hides /proc/cpuinfo and /proc/device-tree, where RPi.GPIO and adafruit-blinka detect the board.
NOT_BY_DEFAULT = ("ProtectClock=", "PrivateDevices=", "DevicePolicy=", "DeviceAllow=", "MemoryDenyWriteExecute=",
                  "ProcSubset=", "PrivateUsers=", "IPAddressDeny=", "PrivateNetwork=")


def test_rendered_unit_lists_the_hardening_directives_and_the_gpio_group(config: Path) -> None:
    """The directive strings are in the rendered unit, and none of those left out by default
    (NOT_BY_DEFAULT) is. Whether GPIO and onnxruntime work under them is not checked here: only a
    service started under them on a Pi could tell."""
    lines = unit_lines(render_unit(UnitSettings(config=config, groups=("gpio",))))
    for expected in HARDENING:
        assert expected in lines, expected
    assert not [line for line in lines if line.startswith(NOT_BY_DEFAULT)]
    assert "SupplementaryGroups=gpio" in lines


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_ok(config: Path, tmp_path: Path) -> None:
    """Below 2.5 in `systemd-analyze security` (systemd 252): 7.7 (EXPOSED) before the hardening lines,
    3.7 before ProtectProc=, PrivateMounts= and the system call filter, 1.9 with them."""
    unit = tmp_path / "mapper.service"
    unit.write_text(render_unit(UnitSettings(config=config, groups=())))
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for mapper\.service: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 2.5, result.stdout  # noqa: PLR2004


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd group (`@system-service`), its subgroups expanded."""
    listing = subprocess.run([ANALYZE, "syscall-filter", name], capture_output=True, text=True, check=True).stdout
    words = [line.strip() for line in listing.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    return set().union(*(syscall_group(w) if w.startswith("@") else {w} for w in words))


# Installs a seccomp allow list as systemd does for SystemCallFilter= with SystemCallErrorNumber=EPERM
# (libseccomp, no_new_privs), then runs argv[2:]. argv[1]: the allowed calls, one a line.
SECCOMP_EXEC = """
import ctypes, os, sys
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
ctx = lib.seccomp_init(0x00050000 | 1)  # SCMP_ACT_ERRNO(EPERM)
for name in open(sys.argv[1]).read().split():
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:  # not every name exists on every architecture
        assert lib.seccomp_rule_add(ctx, 0x7FFF0000, number, 0) == 0, name  # SCMP_ACT_ALLOW
assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""

# What the service does besides GPIO: board detection in /proc, onnxruntime with a thread pool, the
# twin (SQLite, WAL), threads, sockets (loopback TCP, AF_UNIX datagrams as sd_notify's), mmap, asyncio.
WORKLOAD = """
import mmap, os, socket, sqlite3, sys, threading
import numpy as np, onnxruntime as ort
assert open("/proc/cpuinfo").read()
options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
inputs = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in session.get_inputs()}
session.run(None, inputs)
twin = sqlite3.connect(sys.argv[2])
twin.execute("pragma journal_mode=wal"); twin.execute("create table t(x)"); twin.execute("insert into t values (1)")
twin.commit()
thread = threading.Thread(target=os.getpid); thread.start(); thread.join()
with socket.create_server(("127.0.0.1", 0)) as server:
    socket.create_connection(server.getsockname()).close()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.bind(sys.argv[2] + ".sock"); notify.sendto(b"READY=1", sys.argv[2] + ".sock")
mmap.mmap(-1, 4096).close()
import asyncio, grpc
asyncio.run(asyncio.sleep(0))
try:
    os.chown(sys.argv[2], os.getuid(), os.getgid())
except PermissionError:
    print("chown refused")
print("workload ok")
"""


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_the_services_work_runs_under_the_units_system_call_filter(config: Path, tmp_path: Path) -> None:
    """The unit's SystemCallFilter= lines (an allow list, then ~ lines taken away), applied to a process
    doing what the service does: onnxruntime inference with threads, the twin, sockets, /proc/cpuinfo.
    No GPIO here (ioctl on /dev/gpiomem and /dev/gpiochip* is in @system-service). A call the filter
    takes away (chown, @privileged) fails with EPERM instead of killing the process."""
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    filters = [line.partition("=")[2] for line in unit_lines(render_unit(UnitSettings(config=config, groups=())))
               if line.startswith("SystemCallFilter=")]
    allowed: set[str] = set()
    for value in filters:
        calls = set().union(*(syscall_group(w) if w.startswith("@") else {w} for w in value.lstrip("~").split()))
        allowed = allowed - calls if value.startswith("~") else allowed | calls
    assert allowed, f"the unit has no system call allow list: {filters}"
    allow_list = tmp_path / "allowed"
    allow_list.write_text("\n".join(sorted(allowed)) + "\n")
    done = subprocess.run([sys.executable, "-c", SECCOMP_EXEC, str(allow_list), sys.executable, "-c", WORKLOAD,
                           str(REPO / "models" / "rain" / "edge.onnx"), str(tmp_path / "twin.db")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["chown refused", "workload ok"], done.stdout


def test_dry_run_warns_about_paths_under_tmp_which_the_service_does_not_see(tmp_path: Path) -> None:
    """The unit sets PrivateTmp=yes: the service gets an empty /tmp and /var/tmp of its own, so a
    venv, a config, a device directory or a password file under /tmp is not there for it and it
    cannot start. `install-service --dry-run` said nothing about it (it warns about a directory the
    service user cannot enter, such as /root); it warns now, naming each path and why, and still
    exits 0 (a warning, as for /root). Run as a user would: a real venv made under /tmp."""
    import site as this_site

    def venv_in(directory: Path) -> Path:
        """A real venv there that sees this one's packages (mapper's dependencies, its metadata) and
        this checkout; its python."""
        venv = directory / "x" / ".venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        site.joinpath("mapper-test.pth").write_text("\n".join([str(REPO), *this_site.getsitepackages()]) + "\n")
        return python

    made: list[Path] = []
    try:
        base = Path(tempfile.mkdtemp(prefix="mapper-tmp-test-", dir="/tmp"))
        made.append(base)
        # The TLS client certificate and key under /var/tmp, hidden from the service as well.
        var_tmp = Path(tempfile.mkdtemp(prefix="mapper-tmp-test-", dir="/var/tmp"))
        made.append(var_tmp)
        # The interpreter outside /tmp and /var/tmp (this test's own may be under /tmp: a checkout there).
        outside = Path(tempfile.mkdtemp(prefix="mapper-notmp-test-", dir=Path.home()))
        made.append(outside)
        assert not str(outside.resolve()).startswith(("/tmp/", "/var/tmp/")), outside
        base.chmod(0o755)
        var_tmp.chmod(0o755)
        python = venv_in(base)
        other_python = venv_in(outside)
        devices = write_devices(base / "dev", ["a"])
        password = base / "mqtt-password"
        password.write_text("secret\n")
        os.chown(password, pwd.getpwnam("nobody").pw_uid, -1)
        password.chmod(0o600)
        ca_file, cert_file, key_file = base / "ca.crt", var_tmp / "me.crt", var_tmp / "me.key"
        # Real ones: install-service loads them, as `mapper run` does at start.
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_file), "-out",
                        str(cert_file), "-days", "1", "-subj", "/CN=me"], check=True, capture_output=True)
        shutil.copyfile(cert_file, ca_file)
        for tls_file in (ca_file, cert_file, key_file):  # read by the service user only
            os.chown(tls_file, pwd.getpwnam("nobody").pw_uid, -1)
            tls_file.chmod(0o600)
        config = write_config(base / "mapper.yaml", devices, SERVICE_TWIN,
                              extra=f"mqtt: {{username: u, password_file: {password}, tls: {{ca_file: {ca_file},"
                                    f" cert_file: {cert_file}, key_file: {key_file}}}}}\n")
        install = ["-m", "mapper", "install-service", "--config", str(config), "--dry-run", "--user", "nobody",
                   "--groups", "--force"]
        why = ("which the service does not see: the unit's PrivateTmp=yes gives it an empty /tmp and /var/tmp of"
               " its own, so")
        result = subprocess.run([str(python), *install], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "PrivateTmp=yes" in result.stdout
        warnings = result.stderr.splitlines()
        for expected in (
                f"warning: the interpreter {python} is under /tmp, {why} the service cannot start: install the"
                " mapper outside /tmp and /var/tmp (e.g. a venv in /opt/mapper)",
                f"warning: --config: {config} is under /tmp, {why} the service cannot read it: move it out of /tmp"
                " and /var/tmp (e.g. to /etc/mapper)",
                f"warning: devices[0]: {devices} is under /tmp, {why} the service cannot read it: move it out of"
                " /tmp and /var/tmp (e.g. to /etc/mapper)",
                f"warning: mqtt.password_file: {password} is under /tmp, {why} the service cannot read it: move it"
                " out of /tmp and /var/tmp (e.g. to /etc/mapper)",
                f"warning: mqtt.tls.ca_file: {ca_file} is under /tmp, {why} the service cannot read it: move it"
                " out of /tmp and /var/tmp (e.g. to /etc/mapper)",
                f"warning: mqtt.tls.cert_file: {cert_file} is under /var/tmp, {why} the service cannot read it:"
                " move it out of /tmp and /var/tmp (e.g. to /etc/mapper)",
                f"warning: mqtt.tls.key_file: {key_file} is under /var/tmp, {why} the service cannot read it:"
                " move it out of /tmp and /var/tmp (e.g. to /etc/mapper)"):
            assert expected in warnings, (expected, result.stderr)
        assert sum("PrivateTmp" in line for line in warnings) == 7, result.stderr
        # The interpreter outside /tmp: nothing said about it, the rest still warned about.
        result = subprocess.run([str(other_python), *install], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not any("the interpreter" in line and "PrivateTmp" in line for line in result.stderr.splitlines())
        assert f"warning: --config: {config} is under /tmp, {why} the service cannot read it" in result.stderr
        # Inference models: a models_dir and a model named by path (a bare name is looked up in models_dir).
        if importlib.util.find_spec("onnxruntime") is not None:  # the ml extra: `run` refuses inference without it
            models = var_tmp / "models"
            shutil.copytree(REPO / "models" / "sensor_faults", models / "sensor_faults")
            inference = (f"inference:\n  models_dir: {base / 'models'}\n  pipelines:\n"
                         f"    - {{device: a, model: sensor_faults}}\n"
                         f"    - {{device: a, model: {models / 'sensor_faults'}, name: by-path}}\n")
            with_inference = base / "inference.yaml"
            with_inference.write_text(config.read_text() + inference)
            result = subprocess.run([str(other_python), *install[:4], str(with_inference), *install[5:]],
                                    capture_output=True, text=True, cwd=REPO, timeout=60)
            assert result.returncode == 0, result.stderr
            assert f"warning: inference.models_dir: {base / 'models'} is under /tmp, {why} the service cannot read" \
                   " it: move it out of /tmp and /var/tmp (e.g. to /etc/mapper)" in result.stderr.splitlines()
            assert f"warning: inference.pipelines[1].model: {models / 'sensor_faults'} is under /var/tmp, {why} the" \
                   " service cannot read it: move it out of /tmp and /var/tmp (e.g. to /etc/mapper)" \
                   in result.stderr.splitlines(), result.stderr
            # a name: its directory is warned about (the start's own refusals of these pipelines, a models_dir
            # without the model and a device without humidity, are warnings of their own with --force)
            assert not any("inference.pipelines[0]" in line and "PrivateTmp" in line
                           for line in result.stderr.splitlines()), result.stderr
        # kubeedge mode: the DMI socket's directory (a ReadWritePaths= of the unit) under /tmp.
        (base / "kubeedge").mkdir()
        config.write_text(config.read_text() + f"mode: kubeedge\nkubeedge:\n  name: dht\n  protocol: dht\n"
                          f"  socket: {base}/kubeedge/dht.sock\n")
        result = subprocess.run([str(other_python), *install], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"warning: kubeedge.socket: {base}/kubeedge is under /tmp, {why} the service cannot use it (nor" \
               " would what it made there be seen outside it): use a directory outside /tmp and /var/tmp" \
               " (docs/kubeedge.md, As a systemd service)" in result.stderr.splitlines(), result.stderr
    finally:
        for directory in made:
            shutil.rmtree(directory)


def test_dry_run_checks_the_api_token_file_as_the_service_meets_it(
        open_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """api.token_file, as the mqtt password file: install-service (run as root, which reads any
    file) refuses a token file the start would refuse (group-readable) or that the service user
    cannot read, with the chown that fixes it (not chgrp and g+r: the start refuses a group-readable
    token file); one under /tmp is warned about (PrivateTmp=yes hides it). An API beyond loopback
    without a token draws its warning here too."""
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: None)
    devices = write_devices(tmp_path / "dev", ["a"])
    token = open_dir / "api.token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"api: {{host: 0.0.0.0, writes: true, token_file: {token}}}\n")
    install = ["install-service", "--force", "--config", str(config), "--dry-run", "--user", "nobody", "--groups"]
    assert main(install) == 1
    assert (f"api.token_file: the service user 'nobody' cannot read {token} ({token} is root:root 0600):"
            f" sudo chown nobody {token}") in capsys.readouterr().err
    os.chown(token, pwd.getpwnam("nobody").pw_uid, -1)
    assert main(install) == 0
    assert "api.token_file" not in capsys.readouterr().err
    token.chmod(0o640)
    assert main(install) == 1
    assert f"api.token_file: {token} may be read or written by other users than its owner" in capsys.readouterr().err
    hidden = tmp_path / "api.token"  # under /tmp (pytest's): hidden from the service
    hidden.write_text("t" * 32 + "\n")
    hidden.chmod(0o600)
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN, extra=f"api: {{token_file: {hidden}}}\n")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", "root", "--groups"]) == 0
    err = capsys.readouterr().err
    if str(hidden.resolve()).startswith(("/tmp/", "/var/tmp/")):
        assert f"warning: api.token_file: {hidden} is under /tmp" in err, err
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN, extra="api: {host: 0.0.0.0}\n")
    assert main(["install-service", "--force", "--config", str(config), "--dry-run", "--user", "root", "--groups"]) == 0
    assert (f"warning: {config}: api.host: '0.0.0.0' is not loopback and api.token_file is not set"
            in capsys.readouterr().err)


def test_dry_run_checks_the_api_tls_files_as_the_start_does(
        open_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """api.tls (HTTPS for the REST API): install-service loads the certificate as `mapper run` does
    at start, so a key that is not the certificate's refuses the install instead of the service's
    start; the service user must be able to read the files (the chgrp and g+r that fix it)."""
    devices = write_devices(tmp_path / "dev", ["a"])
    made = {}
    for name in ("api", "other"):
        key, cert = open_dir / f"{name}.key", open_dir / f"{name}.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
        key.chmod(0o600)
        made[name] = cert, key
    (cert, key), (_, other_key) = made["api"], made["other"]
    monkeypatch.setattr(subprocess, "run", lambda cmd, *args, **kwargs: None)  # as above: no systemctl here
    install = ["install-service", "--force", "--dry-run", "--user", "nobody", "--groups", "--config"]
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"api: {{tls: {{cert_file: {cert}, key_file: {other_key}}}}}\n")
    assert main([*install, str(config)]) == 1
    assert (f"api.tls.key_file: {other_key} is not the private key of the certificate in api.tls.cert_file ({cert})"
            in capsys.readouterr().err)
    config = write_config(tmp_path / "mapper.yaml", devices, SERVICE_TWIN,
                          extra=f"api: {{tls: {{cert_file: {cert}, key_file: {key}}}}}\n")
    assert main([*install, str(config)]) == 1
    assert (f"api.tls.key_file: the service user 'nobody' cannot read {key} ({key} is root:root 0600):"
            in capsys.readouterr().err)
    os.chown(key, pwd.getpwnam("nobody").pw_uid, -1)
    assert main([*install, str(config)]) == 0


def test_a_path_with_a_newline_is_refused_not_written_into_the_unit(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A unit file is read line by line, quoted or not: a config whose kubeedge.socket held a
    newline put what followed it into the unit as a directive of its own, an `ExecStartPre=+...`
    that systemd runs as root at the next start. Now the install is refused, naming the field."""
    devices = write_devices(tmp_path / "dev", ["a"])
    kube = ('mode: kubeedge\nkubeedge:\n  name: dht\n  protocol: dht\n'
            '  socket: "/run/kube\\nExecStartPre=+/bin/touch /root/pwned\\n#/dht.sock"\n')
    config = write_config(tmp_path / "kube.yaml", devices, SERVICE_TWIN, extra=kube)
    assert main(["install-service", "--config", str(config), "--dry-run", "--groups"]) == 1
    captured = capsys.readouterr()
    assert "ExecStartPre=+" not in captured.out
    assert f"{config}: kubeedge.socket: '/run/kube\\nExecStartPre=+/bin/touch /root/pwned\\n#' holds a control" \
           " character" in captured.err, captured.err
    with pytest.raises(ValueError, match="--config: .* holds a control character"):
        render_unit(UnitSettings(config=Path("/etc/mapper/a\nExecStartPre=+/bin/true\n.yaml"), groups=()))
