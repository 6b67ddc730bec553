"""Config: good files load into typed objects; each wrong file prints its exact error."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatelab import certs
from gateway.config import (
    ConfigError,
    Direction,
    Endpoint,
    FailureSignal,
    InterceptMode,
    LogFormat,
    Smuggling,
    load,
)

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
listeners:
  - {address: 0.0.0.0, port: 10025}
  - {address: "::", port: 10025, mode: tproxy, name: out6}
  - address: 198.51.100.1
    port: 10026
    direction: inbound
    upstreams: ["198.51.100.25:25", "[2001:db8::25]:2525"]
upstream: {mark: 0x25, source_ipv4: 203.0.113.1, on_failure: reset}
limits: {max_sessions: 10, buffer_bytes: 65536}
timeouts: {connect: 5, idle: 60, session: 600, drain: 2.5}
metrics: {listen: "[::1]:9125"}
log: {format: json, level: debug}
tls: {key: /etc/smtpgate/key.pem, cert: /etc/smtpgate/cert.pem}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "smtpgate.yaml"
    p.write_text(text)
    return p


def test_good_config_is_typed(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    out4, out6, inbound = cfg.listeners
    assert out4.address == ipaddress.ip_address("0.0.0.0")
    assert out4.direction is Direction.OUTBOUND and out4.mode is InterceptMode.REDIRECT
    assert out6.mode is InterceptMode.TPROXY and out6.label == "out6"
    assert inbound.direction is Direction.INBOUND
    assert inbound.upstreams == (
        Endpoint(ipaddress.ip_address("198.51.100.25"), 25),
        Endpoint(ipaddress.ip_address("2001:db8::25"), 2525),
    )
    assert cfg.upstream.mark == 0x25
    assert cfg.upstream.source_ipv4 == ipaddress.IPv4Address("203.0.113.1")
    assert cfg.upstream.source_ipv6 is None
    assert cfg.upstream.on_failure is FailureSignal.RESET
    assert (cfg.limits.max_sessions, cfg.limits.buffer_bytes) == (10, 65536)
    assert cfg.timeouts.drain == 2.5
    assert str(cfg.metrics.listen) == "[::1]:9125"
    assert cfg.logging.format is LogFormat.JSON and cfg.logging.level == "DEBUG"
    with pytest.raises(AttributeError):
        cfg.limits.max_sessions = 1  # type: ignore[misc]


@pytest.mark.parametrize(("written", "mode"), [("", Smuggling.NORMALIZE),
                                               (", smuggling: reject", Smuggling.REJECT),
                                               (", smuggling: off", Smuggling.OFF),
                                               (', smuggling: "off"', Smuggling.OFF)])
def test_smuggling_modes(tmp_path: Path, written: str, mode: Smuggling) -> None:
    """The default is normalize; a bare `off` (YAML reads false) means off."""
    cfg = load(write(tmp_path, "listeners: [{address: 127.0.0.1, port: 25, direction: inbound, "
                               f"starttls: passthrough, upstreams: ['192.0.2.1:25']{written}}}]\n"))
    assert cfg.listeners[0].smuggling is mode


def test_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "listeners: [{address: 127.0.0.1, port: 10025}]\n"))
    assert cfg.limits.max_sessions == 2000
    assert cfg.timeouts.connect == 30.0
    assert cfg.upstream.on_failure is FailureSignal.REPLY
    assert str(cfg.metrics.listen) == "127.0.0.1:9125"
    assert (cfg.mta_sts.enabled, cfg.mta_sts.cache, cfg.mta_sts.ca_file) == (True, "auto", None)


def test_mta_sts_per_destination_and_recipient(tmp_path: Path) -> None:
    from gateway.config import Level, StsUse
    from gateway.policy import sts_use

    cfg = load(write(tmp_path, L + "mta_sts: {enabled: false, cache: null}\n"
                     "policy:\n  entries: [{match: .partner.example, mta_sts: off},\n"
                     "            {match: .pay.example, level: may, mta_sts: require}]\n"
                     "  recipients: [{domain: bank.example, mta_sts: require},\n"
                     "               {domain: shop.example, level: encrypt, mta_sts: on}]\n"))
    off, require = cfg.policy.entries
    bank, shop = cfg.policy.recipients
    assert (off.mta_sts, require.mta_sts) == (StsUse.OFF, StsUse.REQUIRE)  # YAML's bare off
    assert (bank.level, bank.mta_sts) == (None, StsUse.REQUIRE)  # only mta_sts: no level
    assert (shop.level, shop.mta_sts) == (Level.ENCRYPT, StsUse.ON)
    assert cfg.mta_sts.cache is None
    # The recipient's entry first, then the destination's, then mta_sts.enabled.
    assert sts_use(False, None, None) is StsUse.OFF
    assert sts_use(True, None, None) is StsUse.ON
    assert sts_use(False, require, None) is StsUse.REQUIRE
    assert sts_use(True, off, bank) is StsUse.REQUIRE
    assert sts_use(True, require, shop) is StsUse.ON


L = "listeners: [{address: 127.0.0.1, port: 10025}]\n"

# (file content, the exact message after "<file>: ")
BAD = [
    ("", "listeners: at least one listener is required"),
    ("- 1\n", "must be a mapping"),
    ("listeners: {address: 1}\n", "listeners: must be a list"),
    ("listeners: [{port: 25}]\n", "listeners[0].address: is required"),
    ("listeners: [{address: 127.0.0.1}]\n", "listeners[0].port: is required"),
    ("listeners: [{address: localhost, port: 25}]\n",
     "listeners[0].address: must be an IP address"),
    ("listeners: [{address: 127.0.0.1, port: 70000}]\n",
     "listeners[0].port: must be an integer of at least 1 and at most 65535"),
    ("listeners: [{address: 127.0.0.1, port: 25, mode: nat}]\n",
     "listeners[0].mode: must be one of: redirect, tproxy"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: sideways}]\n",
     "listeners[0].direction: must be one of: outbound, inbound"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound}]\n",
     "listeners[0].upstreams: an inbound listener needs at least one MTA (IP:PORT)"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound, upstreams: [mx:25]}]\n",
     "listeners[0].upstreams[0]: must be IP:PORT (IPv6 as [ADDRESS]:PORT)"),
    ("listeners: [{address: 127.0.0.1, port: 25, upstreams: ['192.0.2.1:25']}]\n",
     "listeners[0].upstreams: only for inbound listeners: outbound goes to the original "
     "destination"),
    ("listeners: [{address: 127.0.0.1, port: 25}, {address: 127.0.0.1, port: 25}]\n",
     "listeners[1]: duplicate listener 127.0.0.1:25"),
    ("listeners: [{address: 127.0.0.1, port: 25, prot: 1}]\n",
     "listeners[0].prot: unknown key"),
    (L + "limits: {max_sessions: 0}\n", "limits.max_sessions: must be a positive integer"),
    (L + "limits: {max_sessions: yes}\n", "limits.max_sessions: must be a positive integer"),
    (L + "limits: {max_sessions: '100'}\n", "limits.max_sessions: must be a positive integer"),
    (L + "limits: {max_sesions: 100}\n", "limits.max_sesions: unknown key"),
    (L + "limits: {buffer_bytes: 100}\n",
     "limits.buffer_bytes: must be an integer of at least 4096 and at most 67108864"),
    (L + "limits: 5\n", "limits: must be a mapping"),
    (L + "timeouts: {idle: -1}\n", "timeouts.idle: must be a positive number of seconds"),
    (L + "timeouts: {connect: soon}\n",
     "timeouts.connect: must be a positive number of seconds"),
    (L + "upstream: {mark: -1}\n",
     "upstream.mark: must be an integer of at least 0 and at most 4294967295"),
    (L + "upstream: {source_ipv4: '2001:db8::1'}\n",
     "upstream.source_ipv4: must be an IPv4 address"),
    (L + "upstream: {source_ipv6: 192.0.2.1}\n", "upstream.source_ipv6: must be an IPv6 address"),
    (L + "upstream: {on_failure: shrug}\n", "upstream.on_failure: must be one of: reply, reset"),
    (L + "metrics: {listen: 9125}\n",
     "metrics.listen: must be IP:PORT (IPv6 as [ADDRESS]:PORT)"),
    (L + "metrics: {listen: '::1:9125'}\n",
     "metrics.listen: must be IP:PORT (IPv6 as [ADDRESS]:PORT)"),
    (L + "log: {format: xml}\n", "log.format: must be one of: text, json"),
    (L + "log: {level: loud}\n", "log.level: must be one of: DEBUG, INFO, WARNING, ERROR"),
    (L + "extra: 1\n", "extra: unknown key"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound, upstreams: "
     "['192.0.2.1:25']}]\n",
     "listeners[0].starttls: offload needs tls.key and tls.cert (see smtpgate keygen)"),
    ("listeners: [{address: 127.0.0.1, port: 25, client_address: transparent}]\n",
     "listeners[0].client_address: only for inbound listeners"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound, starttls: maybe, "
     "upstreams: ['192.0.2.1:25']}]\n",
     "listeners[0].starttls: must be one of: offload, passthrough"),
    ("listeners: [{address: 127.0.0.1, port: 25, source_address: mta}]\n",
     "listeners[0].source_address: must be one of: gateway, client"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound, source_address: client, "
     "starttls: passthrough, upstreams: ['192.0.2.1:25']}]\n",
     "listeners[0].source_address: only for outbound listeners"),
    ("listeners: [{address: 127.0.0.1, port: 25, smuggling: reject}]\n",
     "listeners[0].smuggling: only for inbound listeners"),
    ("listeners: [{address: 127.0.0.1, port: 25, direction: inbound, smuggling: strict, "
     "starttls: passthrough, upstreams: ['192.0.2.1:25']}]\n",
     "listeners[0].smuggling: must be one of: normalize, reject, off"),
    (L + "tls: {key: /k.pem}\n", "tls.cert: key and cert go together"),
    (L + "workers: 0\n", "workers: must be auto or an integer from 1 to 256"),
    (L + "workers: many\n", "workers: must be auto or an integer from 1 to 256"),
    (L + "policy: {recipients: [{domain: 'x y', level: encrypt}]}\n",
     "policy.recipients[0].domain: not a domain name or .suffix"),
    (L + "policy: {recipients: [{domain: bank.example, level: may}]}\n",
     "policy.recipients[0].level: must be one of: encrypt, dane-only"),
    (L + "policy: {default: fingerprint}\n",
     "policy.default: fingerprint needs pins: use it in an entry with fingerprints"),
    (L + "policy: {entries: [{match: 'bad name!', level: none}]}\n",
     "policy.entries[0].match: not an IP network or hostname"),
    (L + "policy: {entries: [{match: mx.example.com, level: fingerprint}]}\n",
     "policy.entries[0].fingerprints: level fingerprint needs at least one fingerprint"),
    (L + "policy: {entries: [{match: mx.example.com, fingerprints: [abc]}]}\n",
     "policy.entries[0].fingerprints[0]: must be a SHA-256 digest in hex (64 digits, "
     "colons allowed)"),
    (L + "dns: {resolvers: []}\n", "dns.resolvers: at least one resolver is required"),
    (L + "dns: {trusted: ['192.0.2.53:53']}\n", "dns.trusted[0]: is not one of dns.resolvers"),
    (L + "dns: {cache: {min_ttl: 100, max_ttl: 10}}\n",
     "dns.cache.min_ttl: must not exceed dns.cache.max_ttl"),
    (L + "dns: {selftest: {secure: 'not a name!'}}\n",
     "dns.selftest.secure: must be a DNS name (the root is \".\") or null"),
    (L + "dns: {selftest: {bogus: .example.com}}\n",
     "dns.selftest.bogus: must be a DNS name (the root is \".\") or null"),
    (L + "dns: {selftest: {secure: null, bogus: dnssec-failed.org}}\n",
     "dns.selftest.bogus: the self-test is off (dns.selftest.secure: null)"),
    (L + "dns: {selftest: {interval: -1}}\n",
     "dns.selftest.interval: must be a non-negative number of seconds"),
    (L + "dns: {selftest: {every: 5}}\n", "dns.selftest.every: unknown key"),
    (L + "mta_sts: {enabled: maybe}\n", "mta_sts.enabled: must be true or false"),
    (L + "tlsrpt: {enabled: true}\n",
     "tlsrpt.organization: is required when tlsrpt.enabled is true"),
    (L + "tlsrpt: {enabled: true, organization: X, contact: c, sender: 'a b'}\n",
     "tlsrpt.sender: must be an address user@domain"),
    (L + "tlsrpt: {relay: nowhere}\n", "tlsrpt.relay: must be IP:PORT (IPv6 as [ADDRESS]:PORT)"),
    (L + "tlsrpt: {send_after: 86400}\n", "tlsrpt.send_after: must be less than a day (86400 s)"),
    (L + "mta_sts: {cache: 5}\n", "mta_sts.cache: must be a file path, auto or null"),
    (L + "mta_sts: {fetch_timeout: 0}\n",
     "mta_sts.fetch_timeout: must be a positive number of seconds"),
    (L + "policy: {entries: [{match: mx.example.com, mta_sts: sometimes}]}\n",
     "policy.entries[0].mta_sts: must be one of: on, off, require"),
    (L + "policy: {recipients: [{domain: bank.example, mta_sts: maybe}]}\n",
     "policy.recipients[0].mta_sts: must be one of: on, off, require"),
    ("listeners: [\n", "line 2, column 1: expected the node content, but found '<stream end>'"),
    ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == f"{path}: {message}"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load(missing)
    assert str(err.value) == f"{missing}: cannot read: No such file or directory"


def test_check_command_prints_the_error_and_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path, L + "limits: {max_sessions: 0}\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "run", "--check", "-c", str(bad)],
                       check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == f"smtpgate: {bad}: limits.max_sessions: must be a positive integer"
    pki = certs.write_pki(tmp_path / "pki", certs.make_leaf(None, ["mx.example.net"]))
    good = write(tmp_path, GOOD.replace("/etc/smtpgate/key.pem", str(pki["key"]))
                 .replace("/etc/smtpgate/cert.pem", str(pki["cert"])))
    r = subprocess.run([sys.executable, "-m", "gateway", "run", "--check", "-c", str(good)],
                       check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK: 3 listener(s)")


def test_check_reads_the_key_files_as_start_and_reload_do(tmp_path: Path) -> None:
    """run --check (systemd's ExecReload runs it before the HUP) passed a config whose key
    the gateway then refused: now it reads the tls files as start and reload do."""
    pki = certs.write_pki(tmp_path / "pki", certs.make_leaf(None, ["mx.example.net"]))
    other = certs.write_pki(tmp_path / "other", certs.make_leaf(None, ["mx.example.net"]))

    def check(key: Path, cert: Path) -> subprocess.CompletedProcess[str]:
        path = write(tmp_path, GOOD.replace("/etc/smtpgate/key.pem", str(key))
                     .replace("/etc/smtpgate/cert.pem", str(cert)))
        return subprocess.run([sys.executable, "-m", "gateway", "run", "--check", "-c",
                               str(path)], check=False, capture_output=True, text=True,
                              cwd=ROOT, timeout=30)

    assert check(pki["key"], pki["cert"]).returncode == 0
    pki["key"].chmod(0o644)
    r = check(pki["key"], pki["cert"])
    assert r.returncode == 2 and "tls.key:" in r.stderr and "readable by group or others" \
        in r.stderr, r.stderr
    pki["key"].chmod(0o600)
    r = check(pki["key"], tmp_path / "missing.pem")
    assert r.returncode == 2 and "tls.cert:" in r.stderr, r.stderr
    r = check(pki["key"], other["cert"])
    assert r.returncode == 2 and "does not match" in r.stderr, r.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "deploy").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_deploy_examples_are_valid(example: Path) -> None:
    load(example)


# -- YAML edges: one line each, naming where, in milliseconds (issue 20, defect 5) --------

def listeners_text(n: int) -> str:
    return "listeners:\n" + "".join(
        f"  - {{address: 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}, port: 25}}\n"
        for i in range(n))


@pytest.mark.parametrize(("text", "message"), [
    ("listeners: []\nmetrics: {listen: \x00}\n",
     "line 2, column 19: a NUL byte (or another control character) is not allowed"),
    (L + "metrics: {listen: '127.0.0.1:1'}\nmetrics: {listen: null}\n",
     "line 3, column 1: found a repeated key 'metrics': the second would silently win"),
    ("listeners: [{address: 127.0.0.1, port: 010025}]\n",
     "line 1, column 40: 010025: a number with a leading zero is octal in YAML; write it "
     "without the zero (or quote it to mean the text)"),
    (L + "timeouts: {connect: 1:30}\n",
     "line 2, column 21: 1:30: digits with ':' are a base-60 number in YAML; write the "
     "number plainly (or quote it to mean the text)"),
])
def test_yaml_surprises_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert str(err.value) == f"{tmp_path / 'smtpgate.yaml'}: {message}", str(err.value)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("text", ["listeners: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "listeners:\n" + "".join(f"{' ' * i}- \n" for i in range(150))])
def test_deep_nesting_is_one_line(tmp_path: Path, text: str) -> None:
    """5,000 levels used to be a RecursionError traceback; 150 block levels, within the YAML
    parser's own limit, are refused as well: no config nests that deep."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert re.fullmatch(r".*smtpgate\.yaml: line \d+, column \d+: nested more than 100 deep",
                        str(err.value)), str(err.value)
    assert time.monotonic() - started < 1.0


@pytest.mark.slow  # seconds: kept out of the quick tier
def test_a_config_file_is_bounded_in_size_and_checked_in_linear_time(tmp_path: Path) -> None:
    big = write(tmp_path, "# x\n" * 300_000)
    with pytest.raises(ConfigError) as err:
        load(big)
    assert str(err.value) == f"{big}: is {big.stat().st_size} bytes: a config file is at most " \
                             "1048576 bytes"
    # 5,000 listeners load, and a duplicate behind them is found, in linear time (the
    # duplicate check compared every pair: 20,000 took 201 s).
    text = listeners_text(5_000)
    started = time.monotonic()
    assert len(load(write(tmp_path, text)).listeners) == 5_000
    with pytest.raises(ConfigError, match=r"listeners\[5000\]: duplicate listener 10.0.0.0:25"):
        load(write(tmp_path, text + "  - {address: 10.0.0.0, port: 25}\n"))
    assert time.monotonic() - started < 5, time.monotonic() - started


def test_hex_and_plain_numbers_still_read(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, L + "upstream: {mark: 0x2525}\ntimeouts: {connect: 0.5}\n"))
    assert cfg.upstream.mark == 0x2525 and cfg.timeouts.connect == 0.5
