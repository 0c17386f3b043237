"""RFC 7512 URIs: every attribute parsed, and a PIN never in a message, repr or log.

The property test feeds hostile URIs (the mistakes people make: ';' in the
query, a missing '=', an unencoded '&' in the PIN, the PIN in the path, a
missing separator) that contain a known PIN, and asserts that no part of it
reaches any message, repr, traceback or log line.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsmbridge
from hsmbridge import ConfigurationError, HSMError
from hsmbridge.uri import parse_pkcs11_uri


def test_every_rfc7512_attribute_is_parsed() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;serial=0123abcd;model=v2;"
        "library-manufacturer=SoftHSM;library-description=Implementation%20of%20PKCS11;"
        "library-version=2.6;slot-manufacturer=SoftHSM%20project;slot-description=slot%201;"
        "slot-id=42;object=k1;id=%01%02%ff%41;type=private;x-vendor=ignored"
        "?module-name=softhsm2&pin-value=12%2634&x-max-sessions=3"
        "&x-init-reserved=configdir%3D'sql:/tmp/db'&x-other=1"
    )
    assert (uri.token, uri.manufacturer, uri.serial, uri.model) == (
        "My Token",
        "SoftHSM project",
        "0123abcd",
        "v2",
    )
    assert (uri.library_manufacturer, uri.library_description, uri.library_version) == (
        "SoftHSM",
        "Implementation of PKCS11",
        (2, 6),
    )
    assert (uri.slot_manufacturer, uri.slot_description, uri.slot_id) == (
        "SoftHSM project",
        "slot 1",
        42,
    )
    assert (uri.object, uri.id, uri.type) == ("k1", b"\x01\x02\xffA", "private")
    assert uri.module_name == "softhsm2" and uri.module_path is None
    assert uri.pin is not None and uri.pin.value == "12&34"
    assert uri.max_sessions == 3
    assert uri.init_reserved == "configdir='sql:/tmp/db'"
    assert uri.names_object


def test_vendor_attributes_are_ignored_with_a_debug_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="hsmbridge")
    uri = parse_pkcs11_uri("pkcs11:token=t;x-foo=secretish?x-bar=Zq81&pin-value=1")
    assert uri.token == "t"
    notes = [r.getMessage() for r in caplog.records if "vendor (x-) attribute" in r.getMessage()]
    assert len(notes) == 2
    assert not any("secretish" in n or "Zq81" in n or "x-foo" in n for n in notes)


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("pkcs11:token=a;token=b", "token twice"),
        ("pkcs11:type=key", "type must be one of"),
        ("pkcs11:slot-id=x", "slot-id must be a whole number"),
        ("pkcs11:library-version=two", "library-version must be"),
        ("pkcs11:token=t?x-max-sessions=0", "x-max-sessions must be a whole number >= 1"),
        ("pkcs11:token", "token has no '=value'"),
        ("pkcs11:pin-value=1", "pin-value is a PKCS#11 URI query attribute"),
        ("pkcs11:token=t?object=k", "object is a PKCS#11 URI path attribute"),
        ("pkcs11:tokn=t", "1st path attribute of the PKCS#11 URI is not one RFC 7512"),
        ("pkcs11:token=t?module-path=/m.so;x=1", "module-path holds an unencoded"),
        ("pkcs11:token=a=b", "token holds an unencoded"),
        ("pkcs11:token=t?module-path=/a.so&module-name=b", "both module-path and module-name"),
    ],
)
def test_malformed_uris_name_the_attribute(
    uri: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PKCS11_MODULE", NO_MODULE)
    with pytest.raises(ConfigurationError, match=match):
        hsmbridge.open(uri, pin="1234")


# -- a PIN never reaches a message ------------------------------------------------------

#: Where a URI names no module: nothing is loaded, the parse and the errors are the test.
NO_MODULE = "/nonexistent/hsmbridge-test/libp11.so"

#: Two halves, each with a prefix no message contains, so any fragment of
#: either half is recognisable in a text.
_HALF = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=4, max_size=10)
_SEPARATOR = st.sampled_from(["", "&", ";", "=", "?", "&x-", " ", "%", "%26", "#"])

HOSTILE_FORMS = [
    "pkcs11:token=t?module-path=/m.so;pin-value={pin}",  # ';' instead of '&'
    "pkcs11:token=t?pin-value{pin}",  # missing '='
    "pkcs11:token=t?module-path=/m.so&pin-value={pin}",  # unencoded '&' etc. in the PIN
    "pkcs11:token=t;pin-value={pin}",  # the PIN in the path
    "pkcs11:token=t&pin-value={pin}",  # '&' in the path
    "pkcs11:token=t?module-path=/m.sopin-value={pin}",  # missing separator
    "pkcs11:token=t?pin-value={pin}&module-path=/nonexistent.so",
    "pkcs11:token=t?pin-source={pin}",  # the PIN where a file name belongs
    "PKCS11:token=t?pin-value={pin}",
    "pkcs11:token=t?pin-value={pin}&pin-value={pin}",
    "pkcs11:token=t;slot-id={pin}?pin-value={pin}",
    "pkcs12:token=t?pin-value={pin}",
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + repr(record.args))


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Records]:
    monkeypatch.setenv("PKCS11_MODULE", NO_MODULE)
    handler = _Records()
    logger = logging.getLogger("hsmbridge")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def _texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), repr(exc.args), *traceback.format_exception(exc)]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    form=st.sampled_from(HOSTILE_FORMS),
    first=_HALF,
    separator=_SEPARATOR,
    second=_HALF,
)
def test_hostile_uris_never_show_the_pin(
    records: _Records, form: str, first: str, separator: str, second: str
) -> None:
    first, second = "Qz" + first, "Jx" + second
    pin = first + separator + second
    uri = form.format(pin=pin)
    records.lines.clear()
    texts: list[str] = []
    for attempt in (
        lambda: repr(parse_pkcs11_uri(uri)),
        lambda: repr(hsmbridge.open(uri)),
    ):
        try:
            texts.append(attempt())
        except HSMError as exc:
            texts += _texts(exc)
    everything = "\n".join(texts + records.lines)
    for part in (pin, first, second):
        assert part not in everything, f"{part!r} of the PIN leaked for {form!r}"
