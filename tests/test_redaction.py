"""Secrets kept out of what is shown: URLs, keys."""

from __future__ import annotations

import pytest

from car_inference.redaction import checked_userinfo, mask_secret, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://car:s3cret@db:5432/car", "postgresql://car:***@db:5432/car"),
        # libpq and redis-py take a password in the query too: /v1/health showed it to every client
        (
            "postgresql://car@db/car?sslmode=require&password=hunter2",
            "postgresql://car@db/car?sslmode=require&password=***",
        ),
        ("redis://cache:6379/0?PassWord=topsecret", "redis://cache:6379/0?PassWord=***"),
        ("host=db dbname=car password=hunter2 user=car", "host=db dbname=car password=*** user=car"),
        ("host=db password='two words' sslpassword=x", "host=db password=*** sslpassword=***"),
        ("sqlite:///tmp/state.db", "sqlite:///tmp/state.db"),
    ],
)
def test_a_url_is_shown_without_its_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_key_is_shown_by_its_ends_only() -> None:
    assert mask_secret("sk-abcdefghijklmnop") == "sk-…op"
    assert mask_secret("short") == "…"


@pytest.mark.parametrize("url", ["postgresql://car:p@ss@db/car", "postgresql://car:50%off@db/car"])
def test_a_user_part_the_driver_reads_otherwise_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="holds a bare") as info:
        checked_userinfo(url)
    assert "p@ss" not in str(info.value) and "50%off" not in str(info.value)
    assert checked_userinfo("postgresql://car:p%40ss@db/car") == "postgresql://car:p%40ss@db/car"
