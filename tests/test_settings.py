"""Numeric and on/off settings from the environment are read strictly: a bad value names itself at start-up."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from bankagent.settings import _flag, _number, _whole


def test_unset_or_blank_numbers_take_their_defaults(monkeypatch):
    monkeypatch.delenv("UNSET_NUMERIC_SETTING", raising=False)
    assert _number("UNSET_NUMERIC_SETTING", 5, minimum=0) == 5
    monkeypatch.setenv("UNSET_NUMERIC_SETTING", "  ")
    assert _whole("UNSET_NUMERIC_SETTING", 7, minimum=1) == 7


@pytest.mark.parametrize(("raw", "value"), [("1e3", 1000.0), ("0.5", 0.5), (" 30 ", 30.0)])
def test_numbers_are_read_whole(monkeypatch, raw, value):
    monkeypatch.setenv("RUN_LEASE_SECONDS", raw)
    assert _number("RUN_LEASE_SECONDS", 30, minimum=0) == value


@pytest.mark.parametrize("raw", ["abc", "30s", "nan", "inf", "-1"])
def test_a_malformed_or_negative_number_is_improperly_configured_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("RUN_LEASE_SECONDS", raw)
    with pytest.raises(ImproperlyConfigured, match="RUN_LEASE_SECONDS must be a number of at least 0"):
        _number("RUN_LEASE_SECONDS", 30, minimum=0)


@pytest.mark.parametrize("raw", ["1.5", "ten", "-2", "0"])
def test_a_whole_number_setting_refuses_fractions_words_and_values_below_its_minimum(monkeypatch, raw):
    monkeypatch.setenv("RUN_CONCURRENCY", raw)
    with pytest.raises(ImproperlyConfigured, match="RUN_CONCURRENCY must be a whole number of at least 1"):
        _whole("RUN_CONCURRENCY", 1000, minimum=1)


@pytest.mark.parametrize(
    ("raw", "value"), [("on", True), ("True", True), (" yes ", True), ("1", True), ("off", False), ("FALSE", False)]
)
def test_an_on_off_setting_reads_the_usual_spellings(monkeypatch, raw, value):
    monkeypatch.setenv("DJANGO_SSL_REDIRECT", raw)
    assert _flag("DJANGO_SSL_REDIRECT", not value) is value


def test_an_unset_or_blank_on_off_setting_takes_its_default(monkeypatch):
    monkeypatch.setenv("DJANGO_SSL_REDIRECT", " ")
    assert _flag("DJANGO_SSL_REDIRECT", True) is True


@pytest.mark.parametrize("raw", ["of", "enabled", "2", "https"])
def test_an_on_off_setting_refuses_anything_else_rather_than_reading_it_as_off(monkeypatch, raw):
    monkeypatch.setenv("DJANGO_SECURE_COOKIES", raw)
    with pytest.raises(ImproperlyConfigured, match=f"DJANGO_SECURE_COOKIES must be on or off, not '{raw}'"):
        _flag("DJANGO_SECURE_COOKIES", True)
