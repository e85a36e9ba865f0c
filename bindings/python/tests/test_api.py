"""What needs no VM: the error vocabulary and option checks."""

from __future__ import annotations

import pytest

import machinen
from machinen import _native
from machinen.errors import ErrorCode, from_native


def test_error_codes_match_the_library() -> None:
    native = {code for code, _ in _native.error_codes()}
    assert native == {c.value for c in ErrorCode}


def test_native_errors_become_machinen_errors_of_their_family() -> None:
    e = from_native(_native.NativeError(
        '{"code":"FILES_NOT_FOUND","message":"no /x","hint":"look","retryable":false,"causes":["gone"]}'
    ))
    assert isinstance(e, machinen.FilesError)
    assert e.code == ErrorCode.FILES_NOT_FOUND and e.code == "FILES_NOT_FOUND"
    assert e.hint == "look" and e.causes == ["gone"] and not e.retryable
    assert "caused by: gone" in str(e)


def test_bad_options_are_refused_with_codes() -> None:
    with pytest.raises(machinen.BootError) as e:
        machinen.boot(network="wifi")
    assert e.value.code == ErrorCode.BOOT_ARGS_INVALID
    with pytest.raises(machinen.SecretsError) as s:
        machinen.boot(egress_secrets=[{"name": "1BAD", "hosts": "h.test", "value": "x"}])
    assert s.value.code == ErrorCode.SECRETS_INVALID
    with pytest.raises(machinen.NetworkError):
        machinen.boot(net_policy={"allow": ["10.0.0.0/33"]})
    with pytest.raises(machinen.MachinenError) as r:
        machinen.restore("/nonexistent/bundle")
    assert r.value.code == ErrorCode.RESTORE_BUNDLE_INVALID
    with pytest.raises(machinen.MachinenError) as a:
        machinen.attach("no-such-vm-here")
    assert a.value.code.value.startswith("REGISTRY_") or a.value.code.value.startswith("EXEC_")
