"""End to end: one domain, one key (mta.domain), from RCPT to the next hop.

``straße.test`` is ``xn--strae-oqa.test`` in IDNA 2008; IDNA 2003 read it
as ``strasse.test``, another domain.  A ``[routes]`` entry for it must catch
its mail however the client spelled the domain, and none of it may go to
``strasse.test``'s MX (here a second scripted peer, reached through the
test DNS server).
"""
from __future__ import annotations

import smtplib

from test_e2e_relay import SENDER, delivery_lines, dsns, message, mx_peers, relay_config, send
from test_e2e_relay import wait_spool_empty

U_DOMAIN = "stra\u00dfe.test"
A_DOMAIN = "xn--strae-oqa.test"


def test_route_for_u_label_catches_both_spellings(mta_factory, peer_factory, dns_factory):
    # The wrong place: strasse.test's MX (and, should anything look up the
    # A-label by MX, that name's too): mail arriving there was misdelivered.
    port, (wrong,) = mx_peers(peer_factory, ["127.0.0.61"])
    route, origin = peer_factory.spawn(None, None)
    dns_port = dns_factory([
        "strasse.test MX 10 mx.strasse.test",
        f"{A_DOMAIN} MX 10 mx.strasse.test",
        "mx.strasse.test A 127.0.0.61",
    ])
    mta = mta_factory(extra=relay_config(
        dns_port=dns_port, relay={"port": port},
        routes={U_DOMAIN: route.address, "origin.test": origin.address}))
    peer_factory.ready()

    rcpts = [f"u@{U_DOMAIN}", f"a@{A_DOMAIN}", "caps@STRA\u00dfE.TEST", "up@XN--STRAE-OQA.Test"]
    qid = send(mta, SENDER, rcpts, message("idna"), mail_options=["SMTPUTF8"])
    wait_spool_empty(mta)

    assert wrong.transactions() == []
    # One destination (the route), so one transaction with every recipient.
    [tx] = route.transactions()
    assert sorted(tx.accepted) == sorted(rcpts)
    assert dsns(origin) == []
    host, route_port = route.address.rsplit(":", 1)
    lines = delivery_lines(mta, qid)
    assert len(lines) == 4, lines
    assert all(f"relay={host}[{host}]:{route_port} " in ln and "status=sent" in ln
               for ln in lines), lines


def test_strasse_is_another_domain(mta_factory, peer_factory, dns_factory):
    """The route for straße.test does not take strasse.test's mail: that goes by MX."""
    port, (mx,) = mx_peers(peer_factory, ["127.0.0.61"])
    [route] = peer_factory.spawn(None)
    dns_port = dns_factory(["strasse.test MX 10 mx.strasse.test", "mx.strasse.test A 127.0.0.61"])
    mta = mta_factory(extra=relay_config(dns_port=dns_port, relay={"port": port},
                                         routes={U_DOMAIN: route.address}))
    peer_factory.ready()
    send(mta, SENDER, ["s@strasse.test"], message("strasse"))
    wait_spool_empty(mta)
    assert [t.accepted for t in mx.transactions()] == [["s@strasse.test"]]
    assert route.transactions() == []


def test_bad_domain_reply_codes(mta_factory):
    """Invalid names get 501 at RCPT/MAIL (as before); U-labels without
    SMTPUTF8 get 553 5.6.7."""
    mta = mta_factory()
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        s.ehlo("client.e2e.test")
        assert s.mail(SENDER, ["SMTPUTF8"])[0] == 250
        for bad in ("u@\u2603.test", "u@a\u05d0.test", "u@-a.test", "u@[999.1.1.1]"):
            code, text = s.rcpt(bad)
            assert code == 501 and text.startswith(b"5.1.3 "), (bad, code, text)
        assert s.rcpt(f"u@{U_DOMAIN}")[0] == 250
        s.rset()
        code, text = s.mail("x@\u2603.test", ["SMTPUTF8"])
        assert code == 501 and text.startswith(b"5.1.7 "), (code, text)
        s.rset()
        assert s.mail(SENDER)[0] == 250
        s.command_encoding = "utf-8"     # smtplib would not send it without SMTPUTF8
        code, text = s.rcpt(f"u@{U_DOMAIN}")
        assert (code, text[:6]) == (553, b"5.6.7 "), text


def test_relay_domains_match_every_spelling(mta_factory):
    """A client that may not relay may still send to a relay domain, however
    either side spells it; strasse.test is not straße.test."""
    mta = mta_factory(policy={"relay_networks": [],
                              "relay_domains": [U_DOMAIN, ".\u00d6BB.test"]})
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        s.ehlo("client.e2e.test")
        assert s.mail(SENDER, ["SMTPUTF8"])[0] == 250
        for ok in (f"u@{U_DOMAIN}", f"a@{A_DOMAIN}", "c@STRA\u00dfE.TEST", "d@XN--STRAE-OQA.TEST",
                   "e@mail.\u00f6bb.test", "f@mail.xn--bb-eka.test"):
            assert s.rcpt(ok)[0] == 250, ok
        for denied in ("s@strasse.test", "o@obb.test", "g@\u00f6bb.test"):
            code, text = s.rcpt(denied)
            assert (code, text[:6]) == (554, b"5.7.1 "), (denied, text)
