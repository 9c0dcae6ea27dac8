"""The one SOURCE_DATE_EPOCH of a build: flavor key, else environment, else the default."""
from types import SimpleNamespace

import pytest

from tasks.epoch import DEFAULT, MAX, build_epoch, environment_epoch, epoch_env, parse_epoch
from tasks.run import UsageError


@pytest.mark.parametrize("flavor_value, environ, expected", [
    (None, {}, DEFAULT),
    (None, {"SOURCE_DATE_EPOCH": ""}, DEFAULT),
    (None, {"SOURCE_DATE_EPOCH": " 1600000000\n"}, 1600000000),
    (1650000000, {"SOURCE_DATE_EPOCH": "1600000000"}, 1650000000),
    (0, {"SOURCE_DATE_EPOCH": "1600000000"}, 0),
])
def test_build_epoch_flavor_then_environment_then_default(flavor_value, environ, expected):
    assert build_epoch(SimpleNamespace(source_date_epoch=flavor_value), environ) == expected


def test_no_flavor_takes_the_environment():
    assert build_epoch(None, {"SOURCE_DATE_EPOCH": "5"}) == 5
    assert environment_epoch({}, default=7) == 7


@pytest.mark.parametrize("text", ["yesterday", "-1", "1.5", "0x10", str(MAX + 1)])
def test_bad_environment_epoch_is_refused(text):
    with pytest.raises(UsageError, match=r"SOURCE_DATE_EPOCH=.*seconds since 1970-01-01 UTC"):
        parse_epoch(text)


def test_epoch_env():
    assert epoch_env(1700000000) == {"SOURCE_DATE_EPOCH": "1700000000"}
