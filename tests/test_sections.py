"""provision/sections.py: the one parser of `@@section` command output."""
from __future__ import annotations

from provision import sections as S


def test_split_keeps_order_lines_and_unknown_markers_as_content():
    out = "noise before\n@@os\nID=debian\n  indented\n@@disk\n/\n@@weird\n@@os\nmore\n"
    got = S.split(out, ("os", "disk", "absent"))
    assert got == {"os": ["ID=debian", "  indented", "more"], "disk": ["/", "@@weird"], "absent": []}
    # without names every marker counts, and only the sections seen are keys
    assert S.split(out) == {"os": ["ID=debian", "  indented", "more"], "disk": ["/"], "weird": []}


def test_parse_gives_repeated_sections_with_their_argument():
    out = "@@builds\n@@b b100-abc\n{\"a\": 1}\n\n@@b b101-def\n{}\n@@ttft {\"depth\": 0}\n"
    secs = S.parse(out)
    assert [(s.name, s.arg) for s in secs] == [("builds", ""), ("b", "b100-abc"), ("b", "b101-def"),
                                              ("ttft", '{"depth": 0}')]
    assert secs[1].lines == ['{"a": 1}', ""] and secs[2].text == "{}"


def test_marker_rules():
    assert S.marker("@@rc 0") == ("rc", "0")
    assert S.marker("@@rc\r") == ("rc", "")
    assert S.marker("@@ rc") is None and S.marker("x @@rc") is None and S.marker("@@") is None
    assert S.marker("@@start", ("rc",)) is None


def test_first_line_of_a_section():
    sec = S.split("@@a\n\n  x  \ny\n@@b\n")
    assert S.first(sec, "a") == "x" and S.first(sec, "b", "-") == "-" and S.first(sec, "zz") == ""


def test_the_step_parsers_that_use_it():
    from types import SimpleNamespace

    from provision.steps import rpc, system
    sec = rpc._sections("@@unit\n  active \n@@nft\ntable inet x {\n@@empty\n")
    assert sec == {"unit": ["active"], "nft": ["table inet x {"], "empty": []}
    assert rpc._first(sec, "unit") == "active" and rpc._first(sec, "empty") == ""

    from provision.facts import host as hostfacts
    assert hostfacts.dpkg_interrupted([], []) == ""
    assert "updates is not empty" in hostfacts.dpkg_interrupted(["1234"], [])
    assert hostfacts.dpkg_interrupted([], ["The following packages are only half configured:",
                                           " libfoo  a library"]) == \
        "dpkg --audit: packages left half-installed (libfoo)"
    # read with the host's facts, in their one command
    hf = hostfacts.parse("@@os\nID=debian\n@@dpkg_journal\n@@dpkg_audit\n"
                         "The following packages are only half configured:\n libfoo  a library\n")
    assert hf.dpkg_interrupted == "dpkg --audit: packages left half-installed (libfoo)"
    assert hostfacts.parse("@@os\nID=debian\n@@dpkg_journal\n@@dpkg_audit\n").dpkg_interrupted == ""
    assert "@@dpkg_audit" in hostfacts.script("/srv/models")
