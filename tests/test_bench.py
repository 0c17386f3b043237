"""``hsmbridge bench``: quick runs on SoftHSM2 and on ``hsmbridge serve``, the JSON schema,
the report, the regression gate, and the C ceiling shipped in the native extension.

Nothing here asserts a speed: the runs are tiny (``--quick``, a few ms per
measurement); the point is that every contender runs, the outputs are what
docs/benchmarks.md says, and ``compare`` exits as documented.
"""

from __future__ import annotations

import copy
import html.parser
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from nethsm_fixtures import bridge_of

import hsmbridge
from hsmbridge import RSA, DecryptionFailed
from hsmbridge.bench.compare import compare
from hsmbridge.bench.schema import SCHEMA
from hsmbridge.cli import main
from hsmbridge.mechanisms import Mechanism, signing_input
from hsmbridge.nethsm import NetHSM
from hsmbridge.pkcs11 import Pkcs11HSM, Pkcs11Key
from hsmbridge.pkcs11.ceiling import run_ceiling
from hsmbridge.testing import SoftToken

QUICK = ["--quick", "--threads", "1,2", "--rounds", "2", "--seconds", "0.01"]


def _results(doc: dict[str, Any], workload: str) -> dict[tuple[str, int], dict[str, Any]]:
    entry = next(w for w in doc["workloads"] if w["name"] == workload)
    assert entry["skipped"] is None, entry["skipped"]
    return {(r["contender"], r["threads"]): r for r in entry["results"]}


@pytest.fixture(scope="module")
def softhsm_run(softhsm_token: SoftToken, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run on the session's SoftHSM2 token: JSON and report in a directory."""
    out = tmp_path_factory.mktemp("bench")
    uri = f"{softhsm_token.uri}&pin-value={softhsm_token.pin}"
    only = (
        "ecdsa-p256-sha256-sign,rsa2048-oaep-sha1-decrypt,rsa2048-pss-sha256-sign,"
        "rsa2048-oaep-sha512-decrypt"
    )
    argv = ["bench", "--hsm", uri, "--only", only, *QUICK, "--out", str(out / "r.json")]
    assert main([*argv, "--report", str(out / "report")]) == 0
    return out


def test_softhsm_run_has_every_contender_at_every_thread_count(
    softhsm_run: Path, softhsm_token: SoftToken
) -> None:
    doc = json.loads((softhsm_run / "r.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["hsm"]["backend"] == "pkcs11" and doc["hsm"]["module"]["native_engine"]
    assert doc["settings"]["threads"] == [1, 2]
    assert softhsm_token.pin not in doc["settings"]["hsm"]  # the result names no PIN
    for workload in (
        "ecdsa-p256-sha256-sign",
        "rsa2048-oaep-sha1-decrypt",
        "rsa2048-pss-sha256-sign",
    ):
        results = _results(doc, workload)
        contenders = {"c-ceiling", "python-pkcs11", "hsmbridge-single", "hsmbridge-batch",
                      "hsmbridge-batch-python", "openssl"}  # fmt: skip
        assert set(results) == {(c, t) for c in contenders for t in (1, 2)}
        for (name, _), r in results.items():
            assert len(r["rounds"]) == 2 and all(x["ops"] >= 1 for x in r["rounds"])
            assert (r["latency_us"] is not None) == (
                name in ("python-pkcs11", "hsmbridge-single", "openssl")
            )
        entry = next(w for w in doc["workloads"] if w["name"] == workload)
        pairs = {(q["contender"], q["over"], q["threads"]) for q in entry["ratios"]}
        assert ("hsmbridge-batch", "c-ceiling", 2) in pairs
    # SoftHSM2 2.6 has OAEP with SHA-1 only: the others are reported as skipped, not run
    skipped = next(w for w in doc["workloads"] if w["name"] == "rsa2048-oaep-sha512-decrypt")
    assert skipped["results"] == [] and "rsa-oaep-sha512" in skipped["skipped"]


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_is_self_contained_with_well_formed_plots(softhsm_run: Path) -> None:
    report = softhsm_run / "report"
    page = _Page()
    page.feed((report / "index.html").read_text())
    assert page.external == []  # opens offline: nothing to fetch
    assert page.tags.count("svg") == 9  # throughput, CPU/op, latency for the 3 workloads run
    for name in ("ecdsa-p256-sha256-sign", "rsa2048-oaep-sha1-decrypt"):
        for kind in ("throughput", "cpu", "latency"):
            root = ET.parse(report / f"{kind}-{name}.svg").getroot()
            assert root.tag == "{http://www.w3.org/2000/svg}svg"
            lines = root.findall(".//{http://www.w3.org/2000/svg}polyline")
            assert lines, f"{kind} plot of {name} has no lines"
    svg = "{http://www.w3.org/2000/svg}"
    drawn = {
        kind: [
            p.get("points") for p in ET.parse(report / f"{kind}-{name}.svg").iter(svg + "polyline")
        ]
        for kind in ("throughput", "cpu")
    }
    assert drawn["throughput"] != drawn["cpu"]  # each plot draws its own figure
    legend = ET.parse(report / "throughput-ecdsa-p256-sha256-sign.svg").getroot()
    texts = {t.text for t in legend.iter("{http://www.w3.org/2000/svg}text")}
    assert {"c-ceiling", "openssl", "hsmbridge-batch"} <= texts
    jsonschema.validate(json.loads((report / "result.json").read_text()), SCHEMA)


def test_nethsm_run_against_hsmbridge_serve(
    nethsm_hsm: NetHSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = bridge_of(nethsm_hsm)
    monkeypatch.setenv("NETHSM_PASSWORD", bridge.admin.passphrase)
    monkeypatch.setenv("NETHSM_ADMIN_PASSWORD", bridge.admin.passphrase)
    monkeypatch.setenv("NETHSM_OPERATOR_PASSWORD", bridge.operator.passphrase)
    uri = f"nethsm://{bridge.admin.user}@{bridge.hostport}?fingerprint={bridge.fingerprint}"
    out = tmp_path / "r.json"
    users = ["--admin", bridge.admin.user, "--operator", bridge.operator.user]
    argv = ["bench", "--hsm", uri, *users, "--only", "ecdsa-p256-sha256-sign", *QUICK]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["hsm"]["backend"] == "nethsm"
    contenders = {"nethsm-sdk", "hsmbridge-single", "hsmbridge-batch", "openssl"}
    assert set(_results(doc, "ecdsa-p256-sha256-sign")) == {
        (c, t) for c in contenders for t in (1, 2)
    }


def _synthetic(doc: dict[str, Any], contender: str, factor: float, spread: float) -> dict[str, Any]:
    """``doc`` with ``contender``'s CPU per operation multiplied by ``factor``."""
    new = copy.deepcopy(doc)
    for w in new["workloads"]:
        for r in w["results"]:
            if r["contender"] == contender:
                r["cpu_us_per_op"]["median"] *= factor
                r["cpu_us_per_op"]["spread"] = spread
    return new


def test_compare_exits_1_on_a_regression_beyond_the_noise(
    softhsm_run: Path, tmp_path: Path
) -> None:
    path = softhsm_run / "r.json"
    doc = json.loads(path.read_text())
    for w in doc["workloads"]:  # a quiet machine: the threshold decides
        for r in w["results"]:
            r["cpu_us_per_op"]["spread"] = 0.01
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    cases = [
        (_synthetic(doc, "hsmbridge-batch", 1.5, 0.01), 1),  # 33% worse: a regression
        (_synthetic(doc, "hsmbridge-batch", 1.05, 0.01), 0),  # 5% worse: under the threshold
        (_synthetic(doc, "hsmbridge-batch", 1.5, 0.6), 0),  # 33% worse, but the run was that noisy
        (_synthetic(doc, "openssl", 3.0, 0.01), 0),  # a baseline moved: not hsmbridge's doing
        (_synthetic(doc, "hsmbridge-batch", 0.5, 0.01), 0),  # faster
    ]
    for new_doc, status in cases:
        new = tmp_path / "new.json"
        new.write_text(json.dumps(new_doc))
        assert main(["bench", "compare", str(old), str(new)]) == status
    regressed = compare(doc, cases[0][0])
    assert {r["contender"] for r in regressed["regressions"]} == {"hsmbridge-batch"}
    assert main(["bench", "compare", str(old), str(path.parent)]) == 1  # not a result: an error


def test_compare_refuses_what_is_not_a_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": []}))
    assert main(["bench", "compare", str(other), str(other)]) == 1
    assert "not an hsmbridge bench result" in capsys.readouterr().err


def test_ceiling_ships_in_the_native_extension(pkcs11_hsm: hsmbridge.HSM) -> None:
    """hsmbridge._native.ceiling runs the operations it is asked for and reports failures."""
    assert isinstance(pkcs11_hsm, Pkcs11HSM) and pkcs11_hsm.native is not None
    key = pkcs11_hsm.generate_key(
        RSA(2048), label=f"ceiling-{os.getpid()}", usage={"sign", "decrypt"}
    )
    assert isinstance(key, Pkcs11Key)
    try:
        item = signing_input(Mechanism.RSA_PSS_SHA256, b"message", prehashed=False)
        run = run_ceiling(key, "sign", Mechanism.RSA_PSS_SHA256, item, count=20, threads=2)
        assert (run.count, run.threads) == (20, 2) and run.seconds > 0 and run.cpu_seconds > 0
        with pytest.raises(DecryptionFailed):
            run_ceiling(key, "decrypt", Mechanism.RSA_OAEP_SHA1, b"\x01" * 256, count=4, threads=2)
        with pytest.raises(ValueError, match="count must be >= 1"):
            pkcs11_hsm.native.ceiling(
                pkcs11_hsm.module.path, 0, [1], key.handle, 1, None, b"x", 256, 0
            )
    finally:
        key.delete()


REPO = Path(__file__).resolve().parent.parent


def _readme_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_readme", REPO / "benchmarks" / "readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_performance_section_is_generated_from_the_committed_result() -> None:
    readme = _readme_module()
    doc = json.loads(readme.RESULT.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert readme.main(["--check"]) == 0, "run: .venv/bin/python benchmarks/readme.py"
    section = readme.section(doc)
    assert section in (REPO / "README.md").read_text()
    assert len(doc["settings"]["threads"]) >= 3  # the README shows a thread sweep
    for plot in readme.PLOTS.values():  # the plots the README shows are well-formed
        ET.fromstring(plot.read_text())


def test_docs_describe_every_field_of_the_schema() -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text()

    def fields(schema: dict[str, Any]) -> set[str]:
        found = set(schema.get("properties", {}))
        for sub in schema.get("properties", {}).values():
            found |= fields(sub)
            if isinstance(sub.get("items"), dict):
                found |= fields(sub["items"])
        return found | set(schema.get("required", []))

    missing = sorted(f for f in fields(SCHEMA) if f"`{f}`" not in text and not f.startswith("$"))
    assert not missing, f"docs/benchmarks.md does not describe {missing}"


def test_bad_options_are_reported_before_any_hsm_is_opened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--hsm", "pkcs11:token=absent", "--only", "rsa1024-*"]) == 1
    err = capsys.readouterr().err
    assert "--only rsa1024-* matches no workload" in err and "ecdsa-p256-sha256-sign" in err
    assert main(["bench", "--hsm", "pkcs11:token=absent", "--threads", "0"]) == 1
    assert "between 1 and 256" in capsys.readouterr().err
