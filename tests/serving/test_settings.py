"""Settings and the start-up exposure check."""

from __future__ import annotations

import pytest

from serving.settings import Settings, check_exposure, is_loopback


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_refuses_public_bind_without_tokens() -> None:
    with pytest.raises(SystemExit, match="ENGINEHOUSE_AUTH_TOKENS"):
        check_exposure(Settings(host="0.0.0.0", auth_tokens=""))
    with pytest.raises(SystemExit, match=r"0\.0\.0\.0"):
        check_exposure(Settings(data_host="0.0.0.0", auth_tokens=""))
    check_exposure(Settings(host="0.0.0.0", data_host="0.0.0.0", auth_tokens="default:s3cret"))
    check_exposure(Settings())
    # a token made with `enginehouse token create` (in the registry) is enough too
    check_exposure(Settings(host="0.0.0.0", auth_tokens=""), stored_tokens=1)


def test_tokens_parse_and_reject_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEHOUSE_AUTH_TOKENS", "default:abc, other:def")
    assert Settings().tokens() == {"abc": "default", "def": "other"}
    with pytest.raises(ValueError, match="project:token"):
        Settings(auth_tokens="justatoken").tokens()
