"""mta.domain: the one normalisation of domain names (IDNA 2008 + UTS #46,
case, trailing dot, address literals) -- known vectors and properties."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta import domain
from mta.domain import (DomainError, config_key, is_literal, key, literal_ip, to_ascii,
                        to_unicode)

props = settings(deadline=None, max_examples=200)


@pytest.mark.parametrize("name, ascii_, unicode_", [
    # IDNA 2008, non-transitional: ß is kept (IDNA 2003 made it "strasse.de").
    ("stra\u00dfe.de", "xn--strae-oqa.de", "stra\u00dfe.de"),
    ("xn--strae-oqa.de", "xn--strae-oqa.de", "stra\u00dfe.de"),
    ("XN--STRAE-OQA.DE", "xn--strae-oqa.de", "stra\u00dfe.de"),
    ("STRA\u00dfE.DE", "xn--strae-oqa.de", "stra\u00dfe.de"),
    ("strasse.de", "strasse.de", "strasse.de"),
    # UTS #46 maps case before IDNA 2008 applies.
    ("\u00d6BB.at", "xn--bb-eka.at", "\u00f6bb.at"),
    ("\u00f6bb.at", "xn--bb-eka.at", "\u00f6bb.at"),
    ("B\u00fccher.Test.", "xn--bcher-kva.test", "b\u00fccher.test"),
    ("fa\u00df.DE", "xn--fa-hia.de", "fa\u00df.de"),
    # Full-width letters and the ideographic full stop are mapped.
    ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\u3002com", "example.com", "example.com"),
    # Trailing dot (the root) and case.
    ("Example.COM.", "example.com", "example.com"),
    ("  example.com ", "example.com", "example.com"),
    ("mx_1.example.com", "mx_1.example.com", "mx_1.example.com"),
    ("localhost", "localhost", "localhost"),
    # Address literals: kept as literals, written one way.
    ("[192.0.2.1]", "[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:DB8:0:0::1]", "[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    ("[ipv6:::1]", "[IPv6:::1]", "[IPv6:::1]"),
    ("[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:c000:201]", "[IPv6:::ffff:c000:201]"),
    ("[x-tag:Some-Thing]", "[x-tag:Some-Thing]", "[x-tag:Some-Thing]"),
    # An A-label that is not valid IDNA: the ASCII name as it is, for display too.
    ("xn--zz.test", "xn--zz.test", "xn--zz.test"),
])
def test_known_vectors(name: str, ascii_: str, unicode_: str) -> None:
    assert to_ascii(name) == ascii_
    assert to_unicode(name) == unicode_
    assert key(name) == ascii_


@pytest.mark.parametrize("name", [
    "", " ", ".", "..", "a..b", ".example.com", "example.com..", "-a.test", "a-.test",
    "exa mple.test", "a@b.test", "a/b.test", "a" * 64 + ".test",
    ".".join(["a" * 63] * 4),           # 255 octets: longer than DNS allows (253)
    "\u2603.net",                        # a symbol: IDNA 2003 took it, IDNA 2008 does not
    "a\u05d0.test",                      # Latin and Hebrew in one label: the bidi rule
    "\u0301abc.test",                    # a label that starts with a combining mark
    "xn--\u00e4.test", "\u00e4\u3002\u3002test",
    "[192.0.2.1", "[]", "[999.0.2.1]", "[01.2.3.4]", "[IPv6:2001:db8::g]",
    "[IPv6:fe80::1%eth0]", "[foo bar]", "[:x]",
])
def test_invalid(name: str) -> None:
    with pytest.raises(DomainError):
        to_ascii(name)
    with pytest.raises(DomainError):
        to_unicode(name)
    assert isinstance(key(name), str)   # never raises
    assert issubclass(DomainError, ValueError)


def test_longest_name() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == domain.MAX_LENGTH
    assert to_ascii(name + ".") == name


def test_key_of_invalid_names() -> None:
    assert key("Exa Mple.Test.") == "exa mple.test"
    assert key("[Foo Bar]") == "[Foo Bar]"


def test_literals() -> None:
    assert is_literal("[192.0.2.1]") and is_literal("[tag:x]")
    assert not is_literal("example.com") and not is_literal("")
    assert literal_ip("[192.0.2.1]") == "192.0.2.1"
    assert literal_ip("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert literal_ip("[tag:x]") is None
    assert literal_ip("example.com") is None
    with pytest.raises(DomainError):
        literal_ip("[300.0.0.1]")


def test_imports_nothing_from_mta() -> None:
    tree = ast.parse(Path(domain.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("mta"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("mta") for a in node.names), ast.dump(node)


# -- properties ------------------------------------------------------------------

LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: Letters of several scripts (Latin with diacritics, sharp s, Greek, Cyrillic,
#: CJK, Hebrew, Arabic, Devanagari), digits, hyphen, full-width letters, the
#: ideographic full stop, and anything else hypothesis comes up with.
LABEL_CHARS = st.one_of(
    st.sampled_from(LDH + "-"),
    st.sampled_from("\u00e4\u00f6\u00fc\u00c4\u00d6\u00dc\u00df\u00e9\u00e8\u00e7\u00f1"
                    "\u03b1\u03b2\u0393\u0436\u0434\u0416\u4e2d\u6587\u05d0\u05d1"
                    "\u0627\u0644\u0915\u093f\uff41\uff22"),
    st.characters(min_codepoint=0x80, max_codepoint=0x2FFFF, exclude_categories=("Cs",)),
)


def names():
    label = st.text(LABEL_CHARS, min_size=1, max_size=20)
    return st.tuples(st.lists(label, min_size=1, max_size=4).map(".".join),
                     st.booleans()).map(lambda t: t[0] + ("." if t[1] else ""))


def valid_names():
    def ok(name: str) -> bool:
        try:
            to_ascii(name)
        except DomainError:
            return False
        return True
    return names().filter(ok)


@props
@given(valid_names())
@example("stra\u00dfe.de")
@example("\u00d6BB.at")
@example("xn--strae-oqa.de.")
def test_to_ascii_properties(name: str) -> None:
    a = to_ascii(name)
    assert a.isascii() and a == a.lower() and not a.endswith(".")
    assert len(a) <= domain.MAX_LENGTH
    assert all(0 < len(label) <= domain.MAX_LABEL for label in a.split("."))
    assert to_ascii(a) == a                       # idempotent
    assert to_ascii(a.upper()) == a               # ASCII case does not matter
    assert to_ascii(a + ".") == a                 # nor does the root's dot
    u = to_unicode(name)
    assert to_ascii(u) == a                       # display form names the same domain
    assert to_unicode(u) == u
    assert to_unicode(a) == u
    assert key(name) == a


@props
@given(st.one_of(st.text(max_size=80), names(),
                 st.text(st.sampled_from("[]:.0123456789abcdefIPv6"), max_size=30)))
def test_only_domain_error(text: str) -> None:
    try:
        a = to_ascii(text)
    except DomainError:
        assert isinstance(key(text), str)
        return
    assert to_ascii(a) == a
    assert to_ascii(to_unicode(text)) == a


def test_config_key_names_what_was_configured() -> None:
    assert config_key("Stra\u00dfe.Test.", "route") == "xn--strae-oqa.test"
    with pytest.raises(DomainError) as info:
        config_key(".sub.test", "route_tls")
    assert str(info.value).startswith("bad route_tls domain '.sub.test': ")
