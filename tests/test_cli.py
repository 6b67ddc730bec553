"""The command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent


def smtpgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=30, check=False)


def test_version() -> None:
    r = smtpgate("version")
    assert (r.returncode, r.stdout) == (0, f"smtpgate {gateway.__version__}\n")
    r = smtpgate("--version")
    assert (r.returncode, r.stdout) == (0, f"smtpgate {gateway.__version__}\n")
    r = smtpgate("version", "-v")
    assert "uvloop" in r.stdout and "dnspython" in r.stdout


@pytest.mark.parametrize("cmd", [[], ["run"], ["version"]])
def test_help(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*cmd, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smtpgate")


def test_no_command_is_a_usage_error() -> None:
    r = smtpgate()
    assert r.returncode == 2 and "usage: smtpgate" in r.stderr


def test_run_with_missing_config_names_it() -> None:
    r = smtpgate("run", "-c", "/nonexistent/smtpgate.yaml")
    assert r.returncode == 2
    assert r.stderr == ("smtpgate: /nonexistent/smtpgate.yaml: cannot read: "
                        "No such file or directory\n")


def test_run_fails_cleanly_when_a_listener_cannot_be_opened(tmp_path: Path) -> None:
    """192.0.2.99 is no address of this host: bind fails, nothing is left running."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listeners: [{address: 192.0.2.99, port: 10025}]\n"
                   "metrics: {listen: null}\nlog: {format: json}\n")
    r = smtpgate("run", "-c", str(cfg))
    assert r.returncode == 1
    assert (f'"error":"{cfg}: listeners[0]: cannot listen on 192.0.2.99:10025: '
            'Cannot assign requested address"') in r.stderr


def test_run_refuses_a_source_address_this_host_does_not_have(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listeners: [{address: 127.0.0.1, port: 10025}]\n"
                   "upstream: {source_ipv4: 192.0.2.99}\n"
                   "metrics: {listen: null}\nlog: {format: json}\n")
    r = smtpgate("run", "-c", str(cfg))
    assert r.returncode == 1
    assert (f'"error":"{cfg}: upstream.source_ipv4: 192.0.2.99 is not an address of this '
            'host"') in r.stderr


def test_commands_say_nothing_on_stderr_that_they_did_not_mean(tmp_path: Path) -> None:
    """The installed command as a user runs it (no PYTHONWARNINGS, nothing of pytest's):
    a library's deprecation notice must not reach every user's terminal or a JSON log
    stream (it did: cryptography's DSA deprecation on every command)."""
    exe = Path(sys.executable).with_name("smtpgate")
    if not exe.exists():
        pytest.skip("smtpgate is not installed next to this Python (scripts/install)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    for args in (["version"], ["version", "-v"], ["--help"],
                 ["run", "--check", "-c", str(ROOT / "deploy" / "outbound.yaml")],
                 ["keygen", "--key", str(key), "--cert", str(cert), "--host", "mx.b.test"],
                 ["tlsa", "--cert", str(cert), "--host", "mx.b.test"],
                 ["firewall", "-c", str(ROOT / "deploy" / "outbound.yaml"), "--local-mta"]):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=30, check=False)
        assert r.returncode == 0 and r.stdout, (args, r.stderr)
        # keygen reports what it wrote on stderr (stdout is the record to publish); every
        # other command has nothing to say there.
        said = r.stderr.startswith("wrote ") and "Warning" not in r.stderr \
            if args[0] == "keygen" else r.stderr == ""
        assert said, (args, r.stderr)


def test_demo_without_the_lab_says_where_it_comes_from(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An installed gateway without the lab (the container image): a clear error, not a
    traceback.  The demo itself is the README's first command (scripts/fresh-check)."""
    monkeypatch.setitem(sys.modules, "gatelab.sitelab", None)  # import fails as when absent
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "gatelab" in err and "scripts/demo" in err, err

