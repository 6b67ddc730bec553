"""``smtpgate init``: the starter config of each role, and for inbound the site's key, as an
administrator gets them (the real command in a subprocess), and deploy/*.yaml as the
rendering of the same templates.

The annotated example configs have one source, the templates in gateway/examples/ (they
ship with the package; gateway/starter.py says why).  deploy/outbound.yaml and
deploy/inbound.yaml are those templates rendered for the repository's paths (deploy_text):
edit the template, then ``.venv/bin/python -m tests.test_init`` rewrites deploy/.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from gatelab.markdown import markdown_section
from gateway import starter
from gateway.cli import main
from gateway.config import Direction, load

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / ".venv" / "bin" / "smtpgate"
HOST, HOST2 = "mx.example.com", "mx2.example.com"


def deploy_text(role: str) -> str:
    """What deploy/ROLE.yaml must hold: the template rendered for the repository (the paths
    the systemd unit and docs/operations.md use)."""
    return starter.render(role, f"deploy/{role}.yaml", key="/etc/smtpgate/key.pem",
                          cert="/etc/smtpgate/cert.pem", hosts=[HOST])


def smtpgate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The installed command where scripts/install put it, else the module: a user's run,
    without pytest's warning filters."""
    argv = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "gateway"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)  # the checkout's package, installed or not
    return subprocess.run([*argv, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60, check=False)


def init(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``smtpgate init`` through the same entry point, in this process (a subprocess per
    case cost the quick tier seconds); the real command runs in the tests that call
    :func:`smtpgate` and :func:`check`."""
    argv = ["init", "-c", str(tmp / "etc" / "smtpgate.yaml"), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(tmp), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["smtpgate", *argv], code, out.getvalue(),
                                       err.getvalue())


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return smtpgate("run", "--check", "-c", str(config))


def tlsa_records(out: str) -> list[str]:
    return [line for line in out.splitlines() if " IN TLSA " in line]


# -- one source: the packaged templates and deploy/ ---------------------------------------


@pytest.mark.parametrize("role", starter.ROLES)
def test_deploy_example_is_the_packaged_template(role: str) -> None:
    path = ROOT / "deploy" / f"{role}.yaml"
    want, have = deploy_text(role), path.read_text()
    diff = "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                        str(path), "rendered template"))
    assert have == want, (
        f"deploy/{role}.yaml is generated from gateway/examples/{role}.yaml: edit the "
        f"template, then run `.venv/bin/python -m tests.test_init`\n{diff}")


@pytest.mark.parametrize("role", starter.ROLES)
def test_the_template_fills_every_placeholder_and_nothing_else(role: str) -> None:
    """substitute() refuses an unknown placeholder; here: no ``$`` survives, and the values
    land where they belong."""
    text = starter.render(role, "/x/y.yaml", key="/k/key.pem", cert="/c/cert.pem",
                          hosts=[HOST, HOST2])
    assert "$" not in text
    assert "smtpgate run --check -c /x/y.yaml" in text
    config = starter.check_text(text, "t")
    assert {lst.direction for lst in config.listeners} == {Direction(role)}
    if role == "inbound":
        assert (config.tls.key, config.tls.cert) == ("/k/key.pem", "/c/cert.pem")
        assert f"smtpgate tlsa --cert /c/cert.pem --host {HOST} --host {HOST2}" in text
    else:
        assert (config.tls.key, config.tls.cert) == (None, None)


@pytest.mark.parametrize("path", ["/etc/smtpgate/key.pem", "/srv/a b/key.pem",
                                  "/srv/k: #1.pem", "/srv/\"q'\\.pem", "/srv/nöl.pem",
                                  "/srv/true", "/srv/0x10", "-", "~", "null", "1e3"])
def test_a_path_is_written_as_yaml_reads_it_back(path: str) -> None:
    scalar = starter.yaml_scalar(path)
    assert yaml.safe_load(f"key: {scalar}  # comment") == {"key": path}
    if path == "/etc/smtpgate/key.pem":
        assert scalar == path  # plain where plain is safe: the file reads as written by hand


# -- the command ---------------------------------------------------------------------------


def test_outbound_writes_a_config_that_run_check_accepts(tmp_path: Path) -> None:
    r = init(tmp_path, "--role", "outbound")
    config = tmp_path / "etc" / "smtpgate.yaml"
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert f"created {tmp_path / 'etc'}/ (mode 0755)" in r.stdout  # it did not exist
    assert f"wrote {config} (outbound starter config, mode 0644)" in r.stdout
    assert stat.S_IMODE(config.stat().st_mode) == starter.CONFIG_MODE
    assert sorted(p.name for p in config.parent.iterdir()) == ["smtpgate.yaml"]  # no key
    c = check(config)
    assert (c.returncode, c.stderr) == (0, "")
    assert c.stdout.startswith(f"{config}: OK: 2 listener(s): outbound-v4")
    # The next steps name the commands for this file.
    assert f"smtpgate run --check -c {config}" in r.stdout
    assert f"smtpgate firewall -c {config} --mta-interface IF" in r.stdout
    assert tlsa_records(r.stdout) == []
    # The file is the template for its own path, comments and all.
    assert config.read_text() == starter.render("outbound", str(config))


def test_inbound_writes_key_cert_and_config_that_run_check_accepts(tmp_path: Path) -> None:
    r = init(tmp_path, "--role", "inbound", "--host", HOST, "--host", "MX2.Example.com.")
    etc = tmp_path / "etc"
    config, key, cert = etc / "smtpgate.yaml", etc / "key.pem", etc / "cert.pem"
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    # The files, their modes, and the config naming them (absolute: the gateway's working
    # directory is not init's).
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    loaded = load(config)
    assert (loaded.tls.key, loaded.tls.cert) == (str(key), str(cert))
    assert f"wrote {key} (ECDSA P-256, mode 0600)" in r.stdout
    c = check(config)  # reads the key files too
    assert (c.returncode, c.stderr) == (0, "")
    assert c.stdout.startswith(f"{config}: OK: 2 listener(s): inbound-v4")
    # The certificate: CN the first host, every host a SAN (lower-cased, no trailing dot).
    crt = x509.load_pem_x509_certificate(cert.read_bytes())
    san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, HOST2]
    assert crt.subject.rfc4514_string() == f"CN={HOST}"
    # The records printed are what `smtpgate tlsa` says for that certificate, each at the
    # start of its line (a pasted zone line with leading blanks has another owner).
    records = tlsa_records(r.stdout)
    t = smtpgate("tlsa", "--cert", str(cert), "--host", HOST, "--host", HOST2)
    assert t.returncode == 0
    assert records == t.stdout.splitlines()
    assert len(records) == 2 and all(line.startswith("_25._tcp.") for line in records)
    assert f"smtpgate firewall -c {config} --internet-interface IF" in r.stdout
    assert f"chown smtpgate: {key}" in r.stdout


def test_inbound_key_and_cert_where_asked(tmp_path: Path) -> None:
    """--key/--cert elsewhere (relative paths resolved against init's directory, written
    absolute); their directory is created too."""
    r = init(tmp_path, "--role", "inbound", "--host", HOST, "--key", "keys/site.key",
             "--cert", "keys/site.crt")
    assert r.returncode == 0, r.stderr
    key, cert = tmp_path / "keys" / "site.key", tmp_path / "keys" / "site.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and cert.is_file()
    config = tmp_path / "etc" / "smtpgate.yaml"
    assert (load(config).tls.key, load(config).tls.cert) == (str(key), str(cert))
    assert not (tmp_path / "etc" / "key.pem").exists()
    assert check(config).returncode == 0


def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("present", ["smtpgate.yaml", "key.pem", "cert.pem"])
def test_an_existing_file_is_refused_and_nothing_is_touched(tmp_path: Path,
                                                            present: str) -> None:
    etc = tmp_path / "etc"
    assert init(tmp_path, "--role", "inbound", "--host", HOST).returncode == 0
    for name in {"smtpgate.yaml", "key.pem", "cert.pem"} - {present}:
        (etc / name).unlink()  # only `present` is in the way
    before = _snapshot(etc)
    r = init(tmp_path, "--role", "inbound", "--host", HOST)
    assert r.returncode == 1
    assert r.stderr == f"smtpgate: {etc / present} exists: not overwritten (--force replaces it)\n"
    assert r.stdout == ""
    assert _snapshot(etc) == before  # byte-identical, same mode, and nothing added


def test_every_existing_file_is_named(tmp_path: Path) -> None:
    assert init(tmp_path, "--role", "inbound", "--host", HOST).returncode == 0
    before = _snapshot(tmp_path / "etc")
    r = init(tmp_path, "--role", "inbound", "--host", HOST)
    assert r.returncode == 1
    assert [line.split()[1] for line in r.stderr.splitlines()] == [
        str(tmp_path / "etc" / n) for n in ("key.pem", "cert.pem", "smtpgate.yaml")]
    assert _snapshot(tmp_path / "etc") == before


def test_force_replaces_and_warns_about_the_published_key(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    assert init(tmp_path, "--role", "inbound", "--host", HOST).returncode == 0
    old = _snapshot(etc)
    (etc / "smtpgate.yaml").write_text("edited by hand\n")
    r = init(tmp_path, "--role", "inbound", "--host", HOST, "--force")
    assert r.returncode == 0, r.stderr
    new = _snapshot(etc)
    assert new["key.pem"][0] != old["key.pem"][0]  # a new key
    assert new["cert.pem"][0] != old["cert.pem"][0]
    assert new["smtpgate.yaml"][0] == old["smtpgate.yaml"][0]  # the template again
    assert stat.S_IMODE(new["key.pem"][1]) == 0o600
    assert "warning:" in r.stderr and "TLSA records published for the old key" in r.stderr
    assert check(etc / "smtpgate.yaml").returncode == 0
    # Outbound over an inbound config: --force replaces the config and leaves the keys.
    r = init(tmp_path, "--role", "outbound", "--force")
    assert (r.returncode, r.stderr) == (0, "")
    assert load(etc / "smtpgate.yaml").listeners[0].direction is Direction.OUTBOUND
    assert (etc / "key.pem").read_bytes() == new["key.pem"][0]


@pytest.mark.parametrize(("args", "message"), [
    (["--role", "inbound"], "--role inbound needs --host NAME"),
    (["--role", "inbound", "--host", "mx_1.example.com"], "not a host name"),
    (["--role", "inbound", "--host", "192.0.2.25"], "not a host name"),
    (["--role", "inbound", "--host", "mx.exämple.com"], "not an ASCII host name"),
    (["--role", "outbound", "--host", HOST], "are for --role inbound"),
    (["--role", "outbound", "--key", "k.pem"], "are for --role inbound"),
    (["--role", "inbound", "--host", HOST, "--key", "etc/smtpgate.yaml"],
     "must be three different files"),
    (["--role", "sideways"], "invalid choice"),
    ([], "the following arguments are required: --role"),
])
def test_unusable_input_is_exit_2_and_writes_nothing(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    r = init(tmp_path, *args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert sorted(tmp_path.iterdir()) == []  # not even the directory


def test_a_path_that_cannot_hold_a_file_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "etc").write_text("a file where the directory would be\n")
    r = init(tmp_path, "--role", "outbound")
    assert r.returncode == 2
    assert r.stderr.startswith(f"smtpgate: cannot write {tmp_path / 'etc' / 'smtpgate.yaml'}: ")


def test_a_failed_write_leaves_no_half_site(tmp_path: Path) -> None:
    """The key is written, the certificate cannot be: the key this run made goes again
    (the config would name a pair that does not exist)."""
    blocker = tmp_path / "certs"
    blocker.write_text("not a directory\n")
    r = init(tmp_path, "--role", "inbound", "--host", HOST, "--cert", str(blocker / "c.pem"))
    assert r.returncode == 2
    assert "cannot write" in r.stderr
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == []


def test_modes_do_not_depend_on_the_umask(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Root's umask is 077 on hardened hosts: the gateway's own user must still read the
    directory, the config and the certificate (and never the key)."""
    old = os.umask(0o077)
    try:
        assert starter.init("inbound", str(tmp_path / "a" / "b" / "smtpgate.yaml"),
                            hosts=[HOST]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in tmp_path.rglob("*")}
    assert modes == {"a": 0o755, "a/b": 0o755, "a/b/smtpgate.yaml": 0o644,
                     "a/b/cert.pem": 0o644, "a/b/key.pem": 0o600}
    out = capsys.readouterr().out
    assert f"created {tmp_path / 'a'}/ (mode 0755)\ncreated {tmp_path / 'a' / 'b'}/" in out


def test_a_directory_as_the_config_is_exit_2(tmp_path: Path) -> None:
    r = smtpgate("init", "--role", "outbound", "-c", str(tmp_path), "--force")
    assert r.returncode == 2
    assert r.stderr == (f"smtpgate: {tmp_path} is a directory: name the file (e.g. "
                        f"{tmp_path / 'smtpgate.yaml'})\n")
    assert sorted(tmp_path.iterdir()) == []


def test_a_control_character_in_a_path_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert starter.init("outbound", str(tmp_path / "x\n.yaml")) == 2
    assert "not a usable path" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_operations_md_shows_what_init_prints(tmp_path: Path) -> None:
    """docs/operations.md, "Starting from nothing": its sample is the command's output for
    /etc/smtpgate/smtpgate.yaml, dates and key hashes aside."""
    section = markdown_section((ROOT / "docs" / "operations.md").read_text(),
                               "## Starting from nothing")
    [sample] = re.findall(r"```\n(created .*?)```", section, re.S)
    (tmp_path / "etc").mkdir()  # /etc exists; /etc/smtpgate is created
    r = smtpgate("init", "--role", "inbound", "--host", HOST,
                 "-c", str(tmp_path / "etc" / "smtpgate" / "smtpgate.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    def normal(text: str) -> str:
        text = re.sub(r"until \d{4}-\d\d-\d\d", "until DATE", text)
        return re.sub(r"\b[0-9a-f]{64}\b", "HASH", text)

    assert normal(r.stdout.replace(str(tmp_path), "")) == normal(sample)


if __name__ == "__main__":
    # Regenerate deploy/ from the templates (see the module docstring).
    for role in starter.ROLES:
        (ROOT / "deploy" / f"{role}.yaml").write_text(deploy_text(role))
        print(f"wrote deploy/{role}.yaml")
