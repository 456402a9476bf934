"""Listen addresses are validated at load time, naming the key (docs/decisions.md D14.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded defaults plus the environment only: no ./config.toml, no $GATEWAY_CONFIG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("[::]:0", ("::", 0)),
        ("mx.example.com:25", ("mx.example.com", 25)),
    ],
)
def test_valid_smtp_listen(value: str, expected: tuple[str, int], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GATEWAY_SMTP__LISTEN", value)
    assert load_settings(None).listen == expected


@pytest.mark.parametrize(
    "value", ["garbage", "::1", "[::1]", "[::1", "[::1]x25", "host:", "h:70000", "a b:25", ":25"]
)
def test_invalid_smtp_listen_names_the_key(value: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GATEWAY_SMTP__LISTEN", value)
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    message = str(err.value)
    assert "\n" not in message
    assert f"smtp.listen = {value!r}" in message


def test_http_listen_empty_is_off_and_port_zero_is_allowed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert load_settings(None).http_listen is None
    monkeypatch.setenv("GATEWAY_HTTP__LISTEN", "127.0.0.1:0")
    assert load_settings(None).http_listen == ("127.0.0.1", 0)
    monkeypatch.setenv("GATEWAY_HTTP__LISTEN", "localhost")
    with pytest.raises(ConfigError, match=r"http\.listen"):
        load_settings(None)
