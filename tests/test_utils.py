"""Shared helpers: eps parsing, atomic writes, hashing."""
from __future__ import annotations

import os
import stat

import pytest

from mixacm.utils import atomic_json_dump, atomic_write, config_hash, format_eps, parse_eps


@pytest.mark.parametrize(
    "text, value",
    [("8/255", 8 / 255), ("2/255", 2 / 255), ("0.031", 0.031), (0.5, 0.5), (1, 1.0), (" 4/255 ", 4 / 255), ("0.5/255", 0.5 / 255)],
)
def test_parse_eps_accepts_fractions_and_floats(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=0)


@pytest.mark.parametrize("bad", ["8", 8, 0, "0", -0.1, "1.5", "x/255", "8/0", ""])
def test_parse_eps_rejects_values_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(bad)


def test_format_eps_is_the_inverse_of_parse_eps():
    for text in ("8/255", "2/255", "1/255", "255/255"):
        assert format_eps(parse_eps(text)) == text
    assert format_eps(0.031) == "0.031" and format_eps(8 / 255 + 1e-6) == repr(8 / 255 + 1e-6)
    assert format_eps(" 0.5/255 ") == "0.5/255"  # text is kept as written, once it parses
    with pytest.raises(ValueError, match="8/255"):
        format_eps(8)


def test_parse_eps_hints_at_the_255_convention():
    with pytest.raises(ValueError, match="8/255"):
        parse_eps(8)


def test_atomic_write_leaves_old_file_and_no_temporary_on_error(tmp_path):
    target = tmp_path / "out.json"
    atomic_json_dump({"a": 1}, target)

    def fail(p):
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_json_dump({}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
