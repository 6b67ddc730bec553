"""The packages: the wheel and the Debian package scripts/build-deb makes from the tree.

- The wheel carries the systemd units as data files (``<prefix>/share/smtpgate/systemd/``)
  and the example configs as package data (``gateway/examples/``, read by ``smtpgate init``);
  it installs with pip into a fresh venv, offline, from the wheelhouse build-deb keeps.
- The .deb holds what scripts/build-deb says, and is installed, run and removed in a test
  root: an overlay over this machine's own / (the host's files are its read-only lower
  layer; every write lands in a tmpfs) in private mount, PID and network namespaces, so
  that dpkg, the gateway and the man page run on a real system while the host's dpkg
  database and /usr are never touched.  The namespaces end with the test, and with them
  every process and mount it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import __version__

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("SMTPGATE_WHEELHOUSE", ROOT / "build" / "wheelhouse"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHON* variables (pytest's or the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, **extra}


@dataclass(frozen=True)
class Built:
    deb: Path
    wheel: Path


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    out = Path(tempfile.mkdtemp(prefix="smtpgate-build-deb-"))
    try:
        cp = subprocess.run([str(ROOT / "scripts" / "build-deb"), "--out", str(out)],
                            capture_output=True, text=True, env=clean_env(), timeout=600,
                            check=False)
        assert cp.returncode == 0, cp.stderr
        [deb] = out.glob("smtpgate_*.deb")
        [wheel] = out.glob("smtpgate-*.whl")
        yield Built(deb, wheel)
    finally:
        shutil.rmtree(out)


def run(*argv: str | Path, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300, check=False)


# -- the wheel ------------------------------------------------------------------------------

def test_the_wheel_carries_the_units_and_the_example_configs(built: Built) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    names = set(zipfile.ZipFile(built.wheel).namelist())
    data = f"smtpgate-{__version__}.data/data"
    want = {f"{data}/{target}/{path.name}"
            for target, patterns in project["data-files"].items()
            for pattern in patterns for path in ROOT.glob(pattern)}
    assert f"{data}/share/smtpgate/systemd/smtpgate.service" in want
    assert want <= names, f"data files missing from the wheel: {sorted(want - names)}"
    package_data = {f"{package}/{path.relative_to(ROOT / package)}"
                    for package, patterns in project["package-data"].items()
                    for pattern in patterns for path in (ROOT / package).glob(pattern)}
    assert "gateway/examples/outbound.yaml" in package_data
    assert package_data <= names, f"package data missing: {sorted(package_data - names)}"


def test_the_wheel_installs_into_a_fresh_venv(built: Built, tmp_path: Path) -> None:
    """As a user installs it: a new venv, its own pip, the wheel and what its metadata asks
    for (from the wheelhouse: offline), then the files where docs/deployment.md says."""
    venv = tmp_path / "venv"
    assert run("/usr/bin/python3", "-m", "venv", venv, env=clean_env()).returncode == 0
    pip: list[str | Path] = [venv / "bin" / "pip", "--isolated", "--disable-pip-version-check"]
    env = clean_env(PIP_CONFIG_FILE="/dev/null")
    cp = run(*pip, "install", "--quiet", "--no-index", "--find-links", WHEELHOUSE,
             built.wheel, env=env, cwd=tmp_path)
    assert (cp.returncode, cp.stderr) == (0, "")
    assert run(*pip, "check", env=env).returncode == 0

    units = venv / "share" / "smtpgate" / "systemd"
    for source in (ROOT / "deploy" / "systemd").iterdir():
        assert (units / source.name).read_bytes() == source.read_bytes(), source.name
    smtpgate = venv / "bin" / "smtpgate"
    cp = run(smtpgate, "--version", env=env, cwd=tmp_path)
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, f"smtpgate {__version__}\n", "")
    # The example configs, as package data: smtpgate init writes one, and it loads.
    config = tmp_path / "etc" / "smtpgate.yaml"
    cp = run(smtpgate, "init", "--role", "outbound", "-c", config, env=env, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    cp = run(smtpgate, "run", "--check", "-c", config, env=env, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    # The manual can be made from an installed wheel too.
    cp = run(venv / "bin" / "python", "-m", "gateway.manpage", env=env, cwd=tmp_path)
    assert cp.returncode == 0 and cp.stdout.startswith('.\\" smtpgate(1)')
    # Nothing of the checkout: the venv's own package answered.
    cp = run(venv / "bin" / "python", "-c", "import gateway; print(gateway.__file__)",
             env=env, cwd=tmp_path)
    assert cp.stdout.startswith(str(venv)), cp.stdout


# -- the .deb -------------------------------------------------------------------------------

def test_the_deb_holds_what_build_deb_says(built: Built) -> None:
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert built.deb.name == f"smtpgate_{__version__}_{arch}.deb"
    fields = dict(line.split(": ", 1) for line in run(
        "dpkg-deb", "-f", built.deb, "Package", "Version", "Architecture", "Depends"
    ).stdout.splitlines())
    assert fields["Package"] == "smtpgate" and fields["Architecture"] == arch
    assert fields["Depends"].startswith("python3 (>= 3.11), python3 (<< 3.12)")
    files = {line.split()[-1].removeprefix(".") for line in
             run("dpkg-deb", "-c", built.deb).stdout.splitlines()}
    for path in ("/usr/bin/smtpgate", "/usr/lib/smtpgate/python/gateway/cli.py",
                 "/usr/lib/smtpgate/python/uvloop/", "/usr/lib/smtpgate/python/cryptography/",
                 "/lib/systemd/system/smtpgate.service",
                 "/lib/systemd/system/smtpgate-firewall.service",
                 "/etc/smtpgate/outbound.yaml", "/etc/smtpgate/inbound.yaml",
                 "/usr/share/man/man1/smtpgate.1.gz", "/usr/share/doc/smtpgate/copyright",
                 "/usr/share/doc/smtpgate/README.Debian",
                 "/usr/share/doc/smtpgate/examples/firewall.env"):
        assert path in files, path
    # no active config, no firewall.env (its interfaces are the site's), no lab, no
    # console script of the build machine's
    for absent in ("/etc/smtpgate/smtpgate.yaml", "/etc/smtpgate/firewall.env",
                   "/usr/lib/smtpgate/python/gatelab/", "/usr/lib/smtpgate/python/bin/"):
        assert absent not in files, absent
    assert not [f for f in files if f.startswith("/usr/lib/smtpgate/python/share")]
    with tempfile.TemporaryDirectory() as ctrl:
        assert run("dpkg-deb", "-e", built.deb, ctrl).returncode == 0
        assert sorted(os.listdir(ctrl)) == ["conffiles", "control", "md5sums"]  # no scripts
        assert Path(ctrl, "conffiles").read_text().split() == [
            "/etc/smtpgate/outbound.yaml", "/etc/smtpgate/inbound.yaml"]


# Runs in new mount, PID and network namespaces (unshare): $1 an empty directory for the
# overlay, $2 the .deb, $3 where each step leaves NAME.out and NAME.rc.  Every step runs,
# whatever the one before did; the test reads the results in order.
IN_TEST_ROOT = r"""
set -uo pipefail
work=$1 deb=$2 out=$3
step() { local name=$1; shift; "$@" >"$out/$name.out" 2>&1; echo "$?" >"$out/$name.rc"; }
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs "$work"
mkdir "$work/upper" "$work/work" "$work/root"
root=$work/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
cp "$deb" "$root/tmp/smtpgate.deb"
ip link set lo up
inside() {
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
step install inside dpkg -i /tmp/smtpgate.deb
step status inside dpkg-query -W -f '${Status} ${Version}' smtpgate
step version inside smtpgate --version
step check inside /usr/bin/smtpgate run --check -c /etc/smtpgate/outbound.yaml
step units systemd-analyze verify --root="$root" --man=no smtpgate.service \
    smtpgate-firewall.service
step man inside env MANWIDTH=80 man --warnings -E UTF-8 -l /usr/share/man/man1/smtpgate.1.gz
step manpath inside man -w smtpgate
step run inside bash -c '
    # The shipped example, with two workers: they are `python3 -m gateway` processes, which
    # find the package only through what the launcher gives them.
    { cat /etc/smtpgate/outbound.yaml; echo "workers: 2"; } >/tmp/gateway.yaml
    /usr/bin/smtpgate run -c /tmp/gateway.yaml 2>/tmp/gateway.log &
    pid=$!
    python3 -c "
import re, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:  # refused while starting, 503 until every worker runs
        with urllib.request.urlopen(\"http://127.0.0.1:9125/healthz\", timeout=2) as r:
            status = r.status
    except OSError as exc:
        status = exc
    listening = set(re.findall(r\"listening worker=(\d+)\", open(\"/tmp/gateway.log\").read()))
    if status == 200 and listening == {\"0\", \"1\"}:
        print(\"healthz 200, both workers listening\")
        break
    if time.monotonic() > deadline:
        raise SystemExit(f\"not up: /healthz {status}, workers listening: {listening}\")
    time.sleep(0.1)
"
    up=$?
    kill -TERM "$pid"
    wait "$pid"
    echo "exit $?"
    cat /tmp/gateway.log
    exit "$up"'
# Nothing was written under /usr/lib/smtpgate at run time (.pyc): removal leaves nothing.
step written inside bash -c 'comm -13 <(dpkg -L smtpgate | sort) <(find /usr/lib/smtpgate | sort)'
step remove inside dpkg -r smtpgate
step removed inside sh -c 'test ! -e /usr/bin/smtpgate && test ! -e /usr/lib/smtpgate &&
    test ! -e /lib/systemd/system/smtpgate.service && test -f /etc/smtpgate/outbound.yaml'
step purge inside dpkg --purge smtpgate
step purged inside sh -c 'test ! -e /etc/smtpgate'
"""


def host_has_smtpgate() -> bool:
    return (run("dpkg-query", "-W", "smtpgate").returncode == 0
            or Path("/usr/bin/smtpgate").exists() or Path("/usr/lib/smtpgate").exists())


@pytest.mark.netns
def test_the_deb_installs_runs_and_removes_in_a_test_root(built: Built) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount and network namespaces, overlayfs, chroot)")
    if host_has_smtpgate():
        pytest.skip("smtpgate is installed on this host: the test could not tell the host's "
                    "install from its own")
    base = Path(tempfile.mkdtemp(prefix="smtpgate-test-root-"))
    try:
        work, out = base / "root", base / "out"
        work.mkdir()
        out.mkdir()
        cp = run("unshare", "--mount", "--pid", "--net", "--fork", "--kill-child", "--",
                 "bash", "-c", IN_TEST_ROOT, "in-test-root", work, built.deb, out)
        assert cp.returncode == 0, cp.stderr

        def step(name: str, rc: int = 0) -> str:
            text = (out / f"{name}.out").read_text()
            assert (out / f"{name}.rc").read_text().strip() == str(rc), f"{name}: {text}"
            return text

        installed = step("install")
        assert "warning" not in installed.lower(), installed
        assert step("status") == f"install ok installed {__version__}"
        assert step("version") == f"smtpgate {__version__}\n"
        assert step("check").startswith("/etc/smtpgate/outbound.yaml: OK: ")
        assert step("units") == ""  # systemd-analyze verify: any output is a finding
        page = step("man")
        assert "smtpgate - transparent encryption gateway for port-25 SMTP" in page
        assert "warning" not in page
        assert step("manpath").strip() == "/usr/share/man/man1/smtpgate.1.gz"
        ran = step("run")
        assert "healthz 200, both workers listening\nexit 0\n" in ran, ran
        assert step("written") == ""
        removed = step("remove")
        assert "warning" not in removed.lower(), removed
        step("removed")
        step("purge")
        step("purged")
    finally:
        shutil.rmtree(base)
    # The host saw none of it.
    assert not host_has_smtpgate()
