"""Loading credentials and auth keys: malformed input is a clear start-up error, never plaintext
or open access by accident, and no key is echoed in an error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.common import tls
from llmserve.router.auth import TenantKeys, bearer_token

SECRET = "s3cret-key-value"


@pytest.mark.parametrize(
    "document",
    [
        "not json {",
        json.dumps({"team-a": [SECRET]}),
        json.dumps({"tenants": {}}),
        json.dumps({"tenants": {"team-a": []}}),
        json.dumps({"tenants": {"team-a": SECRET}}),
        json.dumps({"tenants": {"team-a": [""]}}),
        json.dumps({"tenants": {"team-a": [f"{SECRET} "]}}),
        json.dumps({"tenants": {"team-a": [7]}}),
        json.dumps({"tenants": {"": [SECRET]}}),
        json.dumps({"tenants": {"team-a": [SECRET], "team-b": [SECRET]}}),
    ],
)
def test_malformed_keys_files_are_rejected_without_echoing_keys(
    tmp_path: Path, document: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(document)
    with pytest.raises(ValueError) as error:
        TenantKeys.from_file(path)
    assert SECRET not in str(error.value)


def test_missing_keys_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        TenantKeys.from_file(tmp_path / "absent.json")


def test_keys_map_to_their_tenant_only() -> None:
    keys = TenantKeys({"team-a": ["alpha-key", "alpha-key-2"], "team-b": ["beta-key"]})
    assert keys.tenants == ["team-a", "team-b"]
    assert keys.num_keys == 3
    assert keys.tenant_for("alpha-key") == "team-a"
    assert keys.tenant_for("alpha-key-2") == "team-a"
    assert keys.tenant_for("beta-key") == "team-b"
    for wrong in ("", "alpha", "alpha-key-", "ALPHA-KEY", "beta-key\n"):
        assert keys.tenant_for(wrong) is None


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc "),), "abc"),
        ((("x-request-id", "1"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Bearer "),), None),
        ((("authorization", "Basic abc"),), None),
        ((("x-request-id", "1"),), None),
        (None, None),
    ],
)
def test_bearer_token(metadata, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_tls_nothing_given_is_plaintext() -> None:
    assert tls.server_credentials(None, None) is None
    assert tls.channel_credentials(None) is None


def test_tls_half_given_pairs_are_errors(pki) -> None:
    with pytest.raises(ValueError, match="together"):
        tls.server_credentials(pki.server.cert, None)
    with pytest.raises(ValueError, match="needs"):
        tls.server_credentials(None, None, pki.ca)
    with pytest.raises(ValueError, match="together"):
        tls.channel_credentials(pki.ca, pki.client.cert, None)
    with pytest.raises(ValueError, match="needs"):
        tls.channel_credentials(None, pki.client.cert, pki.client.key)


def test_tls_unreadable_or_non_pem_files_are_errors(pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "cert.der"
    not_pem.write_bytes(b"\x30\x82")
    with pytest.raises(ValueError, match="not PEM"):
        tls.server_credentials(not_pem, pki.server.key)
    with pytest.raises(ValueError, match="cannot read"):
        tls.channel_credentials(tmp_path / "absent.crt")
    assert tls.server_credentials(pki.server.cert, pki.server.key, pki.ca) is not None
    assert tls.channel_credentials(pki.ca, pki.client.cert, pki.client.key) is not None


@pytest.mark.parametrize(
    "flags",
    [["--auth-keys-file", "KEYS"], ["--tls-cert", "CERT"], ["--engine-tls-cert", "CERT"]],
)
def test_router_refuses_to_start_on_bad_security_flags(pki, tmp_path: Path, flags) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"team-a": [SECRET], "team-b": [SECRET]}}))
    paths = {"KEYS": str(keys), "CERT": str(pki.server.cert)}
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.router", "--log-format", "json", "--metrics-port", "-1"]
        + [paths.get(flag, flag) for flag in flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "startup_failed"
    assert SECRET not in result.stderr
