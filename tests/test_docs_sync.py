"""The reference docs against the code they describe: docs/configuration.md against the keys
the config loader accepts, docs/metrics.md against what the exporter exposes, docs/interop.md
against the tests it cites.

A failure here names exactly what is missing from (or extra in) a doc: fix the doc (or the
code), not the test. Messages start with "DOCS OUT OF SYNC".

Where the key set comes from. The loader (gateway/config.py) reads every mapping through a
``_Section``; ``done()`` refuses any key the section did not read, so the accepted keys are
exactly the keys the loader asks a section about. Rather than re-reading the source (key
names differ from dataclass field names: ``log`` is ``Config.logging``, ``policy.entries[]``
fields include derived ones), the test parses a small valid config while recording every
``_Section.has()``/``raw()`` call with its key path, list indexes folded to ``[]``
(``listeners[].address``, ``policy.entries[].match``, ``dns.cache.min_ttl``). A section
that is absent from the file is still asked about each of its keys (for the default), so
the recording does not depend on which keys the sample config sets; lists need one item
each, which the sample gives (an outbound and an inbound listener, one policy entry).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import yaml

from gatelab.markdown import backticked, markdown_section, table_rows
from gatelab.monitoring import process_registry
from gateway import config, metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
METRICS_MD = ROOT / "docs" / "metrics.md"
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

SAMPLE_CONFIG = """
listeners:
  - {address: 127.0.0.1, port: 10025, verifying_mtas: [192.0.2.10]}
  - {address: 127.0.0.1, port: 10026, direction: inbound, starttls: passthrough,
     upstreams: ["127.0.0.1:2525"]}
dns:
  resolvers: ["127.0.0.1:53", "192.0.2.53:53"]
  trusted: ["192.0.2.53:53"]
policy:
  entries:
    - {match: 192.0.2.0/24, level: none}
    - match: mx.example.com
      level: fingerprint
      fingerprints: ["0000000000000000000000000000000000000000000000000000000000000000"]
  recipients:
    - {domain: example.org, level: encrypt}
"""


def record_loader() -> tuple[set[str], set[str]]:
    """Parses SAMPLE_CONFIG, recording every key path the loader reads (see the module
    docstring); also returns the lists it read that had no item in the sample (whose item
    keys, if any, could not be seen)."""
    seen: set[str] = set()
    has, raw, items = config._Section.has, config._Section.raw, config._Section.items

    def path_of(section: config._Section, key: str) -> str:
        return re.sub(r"\[\d+\]", "[]", section._join(key))

    def has_recorded(self: config._Section, key: str) -> bool:
        seen.add(path_of(self, key))
        return has(self, key)

    def raw_recorded(self: config._Section, key: str) -> object:
        seen.add(path_of(self, key))
        return raw(self, key)

    def items_recorded(self: config._Section, key: str) -> Iterator[tuple[str, object]]:
        lists.add(path_of(self, key))
        for item in items(self, key):
            filled.add(path_of(self, key))
            yield item

    lists: set[str] = set()
    filled: set[str] = set()
    with mock.patch.object(config._Section, "has", has_recorded), \
            mock.patch.object(config._Section, "raw", raw_recorded), \
            mock.patch.object(config._Section, "items", items_recorded):
        config.parse(yaml.safe_load(SAMPLE_CONFIG), "sample")
    return seen, lists - filled


def loader_keys() -> set[str]:
    """Every key path the loader reads."""
    return record_loader()[0]


def containers(keys: set[str]) -> set[str]:
    """Keys that hold other keys (sections, lists of mappings)."""
    return {k for k in keys for other in keys
            if other.startswith((k + ".", k + "[]."))}


def documented_keys() -> set[str]:
    """Keys of docs/configuration.md, "## Keys": each ``### `section` `` heading and the
    first column of its tables headed ``key`` (``cache.min_ttl`` → ``dns.cache.min_ttl``;
    under a ``(list`` heading, ``address`` → ``listeners[].address``). A cell may name
    several keys (`` `next_key`, `next_cert` ``)."""
    keys = markdown_section(CONFIGURATION_MD.read_text(), "## Keys")
    out: set[str] = set()
    for block in re.split(r"(?m)^(?=### )", keys):
        if not block.startswith("### "):
            continue
        heading = block.splitlines()[0]
        [section, *_] = backticked(heading)
        out.add(section)
        join = f"{section}[]." if "(list" in heading else f"{section}."
        for header, cells in table_rows(block):
            if header[0] == "key":
                out.update(join + k for k in backticked(cells[0]))
    return out


def example_keys(doc: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out |= {path} | example_keys(v, path)
    elif isinstance(doc, list):
        for item in doc:
            out |= example_keys(item, prefix + "[]")
    return out


def test_loader_key_recording_sees_every_section() -> None:
    """The recording itself: it sees nested, list and absent keys, and the sample gives an
    item to every list the loader reads (else the keys of its items would go unseen: a new
    list key needs an item in SAMPLE_CONFIG)."""
    keys, empty_lists = record_loader()
    assert empty_lists == set(), "lists without an item in SAMPLE_CONFIG"
    assert {"listeners[].address", "policy.entries[].match", "dns.cache.min_ttl",
            "upstream.mark", "metrics.listen", "log.level"} <= keys
    assert not any(re.search(r"\[\d", k) for k in keys)


def test_configuration_md_documents_every_key_and_no_other() -> None:
    accepted = loader_keys()
    documented = documented_keys()
    # A container (dns.cache, policy.entries, tls) counts as documented through its keys.
    missing = sorted(k for k in accepted - documented
                     if not any(d.startswith((k + ".", k + "[].")) for d in documented))
    extra = sorted(documented - accepted)
    assert (missing, extra) == ([], []), (
        f"DOCS OUT OF SYNC (docs/configuration.md, ## Keys): keys the loader accepts but "
        f"the doc does not list: {missing}; keys the doc lists that the loader refuses: "
        f"{extra}")


def test_configuration_md_complete_example_is_valid_and_complete() -> None:
    """ "Complete example with every key": it loads, and it names every key (a line
    commented out as ``# key: value`` counts as naming it)."""
    section = markdown_section(CONFIGURATION_MD.read_text(), "## Complete example with every key")
    [block] = re.findall(r"```yaml\n(.*?)```", section, re.S)
    config.parse(yaml.safe_load(block), "docs/configuration.md example")
    uncommented = re.sub(r"(?m)^(\s*)# (\w+: )", r"\1\2", block)
    shown = example_keys(yaml.safe_load(uncommented))
    accepted = loader_keys()
    leaves = accepted - containers(accepted)
    missing = sorted(leaves - shown)
    extra = sorted(shown - accepted)
    assert (missing, extra) == ([], []), (
        f"DOCS OUT OF SYNC (docs/configuration.md, Complete example with every key): "
        f"keys not in the example: {missing}; keys in it the loader refuses: {extra}")


# -- metrics --------------------------------------------------------------------------------

def exposed_families() -> dict[str, tuple[str, set[str]]]:
    """Exposed name → (type, label names) for every metric the exporter defines."""
    registry, _ = process_registry()
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in registry.collect():
        name = fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, "")
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        if fam.type == "info" and not labels:
            labels = {k for s in fam.samples for k in s.labels}
        out[name] = (fam.type, labels)
    return out


def exposed_sample_names() -> set[str]:
    registry, _ = process_registry()
    registry_names = {s.name for fam in registry.collect() for s in fam.samples}
    # Histogram sample names exist even before the first observation.
    return registry_names | {n + suffix for n, (t, _) in exposed_families().items()
                             if t == "histogram" for suffix in ("_bucket", "_sum", "_count")}


def documented_series() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md, "## Series": name → (type as written, label names)."""
    out = {}
    for header, cells in table_rows(markdown_section(METRICS_MD.read_text(), "## Series")):
        if header[0].startswith("name"):
            [name] = backticked(cells[0])
            out[name] = (cells[1], set(backticked(cells[2])))
    return out


def test_metrics_md_documents_every_metric_and_no_other() -> None:
    exposed = exposed_families()
    documented = documented_series()
    missing = sorted(set(exposed) - set(documented))
    extra = sorted(set(documented) - set(exposed))
    assert (missing, extra) == ([], []), (
        f"DOCS OUT OF SYNC (docs/metrics.md, ## Series): exposed but not documented: "
        f"{missing}; documented but not exposed: {extra}")


def test_metrics_md_types_and_labels_match() -> None:
    exposed = exposed_families()
    wrong = []
    for name, (doc_type, doc_labels) in sorted(documented_series().items()):
        if name not in exposed:
            continue  # reported by the test above
        kind, labels = exposed[name]
        if not doc_type.startswith(kind) or doc_labels != labels:
            wrong.append(f"{name}: doc says {doc_type} {sorted(doc_labels)}, exporter has "
                         f"{kind} {sorted(labels)}")
    assert wrong == [], f"DOCS OUT OF SYNC (docs/metrics.md, ## Series): {wrong}"


def test_metrics_md_lists_the_created_series() -> None:
    exposed = {n for n in exposed_sample_names() if n.endswith("_created")}
    documented = set(re.findall(r"`(smtpgate_\w+_created)`", METRICS_MD.read_text()))
    missing, extra = sorted(exposed - documented), sorted(documented - exposed)
    assert (missing, extra) == ([], []), (
        f"DOCS OUT OF SYNC (docs/metrics.md, the _created paragraph): not listed: "
        f"{missing}; listed but not exposed: {extra}")


def test_metrics_md_lists_every_label_value() -> None:
    """Every label value the exporter creates at start, and every upgrade reason, appears
    in docs/metrics.md as `value`."""
    registry, _ = process_registry()
    values: set[str] = set(metrics.TLS_REASONS) | set(metrics.TLS_RESULTS)
    for fam in registry.collect():
        for s in fam.samples:
            # (resolver: an address from the config, not a fixed value)
            values |= {v for k, v in s.labels.items()
                       if k not in ("le", "version", "python", "resolver")}
    text = METRICS_MD.read_text()
    missing = sorted(v for v in values if f"`{v}`" not in text)
    assert missing == [], f"DOCS OUT OF SYNC (docs/metrics.md, Label values): {missing}"


def test_no_doc_names_a_metric_that_does_not_exist() -> None:
    """Every smtpgate_* name in docs/*.md and README.md (tables, example queries, alert
    examples) is one the exporter exposes."""
    known = exposed_sample_names() | set(exposed_families())
    stale: list[tuple[str, str]] = []
    for path in DOCS:
        for name in sorted(set(re.findall(r"(?<![\w:])smtpgate_[a-z0-9_]+", path.read_text()))):
            if name not in known:
                stale.append((str(path.relative_to(ROOT)), name))
    assert stale == [], f"DOCS OUT OF SYNC: names no metric: {stale}"


# -- the session line: every value the code writes is documented --------------------------

def verify_values() -> set[str]:
    """Every text the shells put in the session line's ``verify``: literals assigned to
    ``tls["verify"]`` or to ``reason`` in a handshake method, and dane.Reason."""
    from gateway.dane import Reason

    found = {r.value for r in Reason}
    for path in (ROOT / "gateway" / "outbound.py", ROOT / "gateway" / "inbound.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.AsyncFunctionDef | ast.FunctionDef) \
                    or "handshake" not in fn.name:
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Assign):
                    continue
                target = node.targets[0]
                named = (isinstance(target, ast.Name) and target.id == "reason") or (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.slice, ast.Constant)
                    and target.slice.value == "verify")
                if not named:
                    continue
                for c in ast.walk(node.value):
                    if isinstance(c, ast.JoinedStr):  # an f-string: its text up to the first field
                        head = c.values[0]
                        if isinstance(head, ast.Constant) and isinstance(head.value, str):
                            found.add(head.value + "*")
                    elif isinstance(c, ast.Constant) and isinstance(c.value, str) and not any(
                            c in j.values for j in ast.walk(node.value)
                            if isinstance(j, ast.JoinedStr)):
                        found.add(c.value)
    return found


def session_field(name: str) -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    [row] = [cells for _, cells in table_rows(text) if cells and cells[0] == f"`{name}`"]
    return row[-1]


def test_operations_md_lists_every_verify_value() -> None:
    documented = backticked(session_field("verify"))
    values = verify_values()
    assert "resumed" in values and "handshake failed" in values  # the finder sees them
    missing = [v for v in values if (v[:-1] if v.endswith("*") else v) not in documented
               and not (v.endswith("*") and any(d.startswith(v[:-1]) for d in documented))]
    assert not missing, missing


def test_the_duration_is_as_documented() -> None:
    """Seconds, rounded to the millisecond, a JSON number: what operations.md says."""
    assert "rounded to the millisecond" in session_field("duration")
    source = (ROOT / "gateway" / "session.py").read_text()
    assert '"duration": round(duration, 3),' in source


# -- docs/interop.md: the matrix cites tests that exist, and every interop test is cited ----

INTEROP_MD = ROOT / "docs" / "interop.md"


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_interop_md_cites_only_tests_that_exist_and_every_interop_test() -> None:
    """Each ``tests/…py::test_name`` (a ``[param]`` tail allowed) in docs/interop.md names a
    test function of that file; each test of tests/test_interop_*_netns.py is cited."""
    text = INTEROP_MD.read_text()
    cited = set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", text))
    missing = [f"{f}::{name}" for f, name in sorted(cited)
               if not (ROOT / f).exists() or name not in defined_tests(ROOT / f)]
    assert missing == [], f"DOCS OUT OF SYNC: docs/interop.md cites no such test: {missing}"
    uncited = [f"{path.relative_to(ROOT)}::{name}"
               for path in sorted((ROOT / "tests").glob("test_interop_*_netns.py"))
               for name in sorted(defined_tests(path))
               if (str(path.relative_to(ROOT)), name) not in cited]
    assert uncited == [], f"DOCS OUT OF SYNC: docs/interop.md leaves out: {uncited}"
