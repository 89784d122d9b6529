"""Unit tests for app.security.jwt: the RFC 8725 / RFC 6750 battery.

Every refusal asserts the status, the RFC 6750 error code, the description, and that neither
the description, the challenge nor the logs repeat the token or a claim value. JWKS cases run
against a real HTTP server (tests.support.jwks_server) on a loopback socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from app.config import DEV_JWT_SECRET, Settings
from app.security.jwt import AuthError, JWTVerifier, Principal, mint_token
from tests.support.fakes import FakeClock
from tests.support.jwks_server import JWKSServer, ec_key, rsa_key, running_jwks_server
from tests.support.simserver import unused_port

SECRET = "test-secret-" + "0123456789abcdef" * 4  # 76 bytes: fine for HS256..HS512
OTHER_SECRET = "another-secret-" + "fedcba9876543210" * 4
SUBJECT = "subject-7f3a9c"
ISSUER = "https://issuer.example"
AUDIENCE = "agentserve-api"
LEEWAY = 30.0
DROP = object()
"""Claim value meaning: leave this claim out."""

RSA_1 = rsa_key("rsa-1")
RSA_2 = rsa_key("rsa-2")
EC_1 = ec_key("ec-1")
EC_2 = ec_key("ec-2")

Factory = Callable[..., JWTVerifier]


# --- helpers ------------------------------------------------------------------------------


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_secret": SECRET, "jwt_leeway_seconds": LEEWAY}
    values.update(overrides)
    return Settings(_env_file=None, **values)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": SUBJECT,
        "iat": now,
        "exp": now + 300,
        "scope": "agents:query",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not DROP}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def refused(
    verifier: JWTVerifier,
    authorization: str | None,
    status: int,
    error: str,
    description: str | None = None,
) -> AuthError:
    with pytest.raises(AuthError) as info:
        await verifier.authenticate(authorization)
    exc = info.value
    assert (exc.status, exc.error) == (status, error), exc
    if description is not None:
        assert exc.description == description
    token = (authorization or "").partition(" ")[2].strip()
    shown = [exc.description, str(exc), repr(exc), exc.www_authenticate()]
    for text in shown:
        if token:
            assert token not in text
        assert SUBJECT not in text
    return exc


@pytest.fixture
async def make_verifier() -> AsyncIterator[Factory]:
    created: list[JWTVerifier] = []

    def factory(settings: Settings | None = None, **kwargs: Any) -> JWTVerifier:
        verifier = JWTVerifier(settings or make_settings(), **kwargs)
        created.append(verifier)
        return verifier

    yield factory
    for verifier in created:
        await verifier.aclose()


@pytest.fixture
def verifier(make_verifier: Factory) -> JWTVerifier:
    return make_verifier()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JWKSServer]:
    with running_jwks_server() as server:
        yield server


@pytest.fixture
def jwks(jwks_server: JWKSServer) -> JWKSServer:
    """The shared JWKS server, healthy, serving RSA_1 and EC_1, request count zero."""
    jwks_server.reset([RSA_1.public_jwk(), EC_1.public_jwk()])
    return jwks_server


def jwks_settings(server: JWKSServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_algorithms": ["RS256", "ES256"], "jwt_jwks_url": server.url}
    values.update(overrides)
    return make_settings(**values)


# --- the Authorization header -------------------------------------------------------------


async def test_missing_header_is_a_bare_challenge(verifier: JWTVerifier) -> None:
    exc = await refused(verifier, None, 401, "")
    assert exc.www_authenticate() == 'Bearer realm="agentserve"'
    assert exc.www_authenticate("other") == 'Bearer realm="other"'


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNzd29yZA==",
        "Token abc.def.ghi",
        "Bearer",
        "Bearer ",
        "Bearer a.b.c extra",
        "Bearer a\tb",
        "Bearer tok!en",
        "",
        "bearer",
    ],
)
async def test_not_a_bearer_header_is_invalid_request(
    verifier: JWTVerifier, authorization: str
) -> None:
    exc = await refused(verifier, authorization, 401, "invalid_request")
    assert exc.www_authenticate().startswith('Bearer realm="agentserve", error="invalid_request"')


async def test_scheme_is_case_insensitive(verifier: JWTVerifier) -> None:
    token = hs(claims())
    for scheme in ("bearer", "BEARER", "BeArEr"):
        principal = await verifier.authenticate(f"{scheme} {token}")
        assert principal.subject == SUBJECT


@pytest.mark.parametrize(
    "token",
    [
        "abc.def",
        "abc.def.ghi",
        secrets.token_urlsafe(48),
        "a.b.c.d.e",
        b64url(b"not json") + "." + segment({"sub": "x"}) + ".sig",
        "x" * 9000,
    ],
    ids=["two-segments", "garbage-segments", "random", "five", "bad-header", "huge"],
)
async def test_malformed_token_is_invalid_token(verifier: JWTVerifier, token: str) -> None:
    expected = "token too large" if len(token) > 8192 else "malformed token"
    await refused(verifier, bearer(token), 401, "invalid_token", expected)


async def test_payload_that_is_not_an_object_is_malformed(verifier: JWTVerifier) -> None:
    header = segment({"alg": "HS256", "typ": "JWT"})
    body = b64url(b"[1, 2, 3]")
    signing_input = f"{header}.{body}".encode()
    signature = b64url(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    await refused(
        verifier, bearer(f"{header}.{body}.{signature}"), 401, "invalid_token", "malformed token"
    )


# --- signatures and algorithms ------------------------------------------------------------


async def test_bad_signature(verifier: JWTVerifier) -> None:
    await refused(
        verifier, bearer(hs(claims(), OTHER_SECRET)), 401, "invalid_token", "bad signature"
    )


async def test_tampered_payload_is_a_bad_signature(verifier: JWTVerifier) -> None:
    header, _, signature = hs(claims()).split(".")
    forged = f"{header}.{segment(claims(scope='agents:query admin'))}.{signature}"
    await refused(verifier, bearer(forged), 401, "invalid_token", "bad signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
@pytest.mark.parametrize("signature", ["", "c2ln"])
async def test_alg_none_is_refused(verifier: JWTVerifier, alg: str, signature: str) -> None:
    token = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}.{signature}"
    await refused(verifier, bearer(token), 401, "invalid_token", "algorithm not allowed")


async def test_missing_alg_is_refused(verifier: JWTVerifier) -> None:
    token = f"{segment({'typ': 'JWT'})}.{segment(claims())}."
    await refused(verifier, bearer(token), 401, "invalid_token", "algorithm not allowed")


def forge_hs256_with_public_key(pem: str, payload: dict[str, Any], kid: str | None = None) -> str:
    """The key-confusion attack: HS256 'signed' with the RSA public key as HMAC secret."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{segment(header)}.{segment(payload)}"
    mac = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


async def test_key_confusion_with_public_key_pem_is_refused(make_verifier: Factory) -> None:
    pem = RSA_1.public_pem()
    verifier = make_verifier(make_settings(jwt_algorithms=["RS256"], jwt_public_key=pem))
    assert (await verifier.authenticate(bearer(RSA_1.sign(claims())))).subject == SUBJECT
    for key_text in (pem, pem.strip(), pem.replace("\n", "\\n")):
        token = forge_hs256_with_public_key(key_text, claims())
        await refused(verifier, bearer(token), 401, "invalid_token", "algorithm not allowed")


async def test_key_confusion_via_jwks_is_refused(make_verifier: Factory, jwks: JWKSServer) -> None:
    verifier = make_verifier(jwks_settings(jwks, jwt_algorithms=["RS256"]))
    token = forge_hs256_with_public_key(RSA_1.public_pem(), claims(), kid=RSA_1.kid)
    await refused(verifier, bearer(token), 401, "invalid_token", "algorithm not allowed")
    assert jwks.requests == 0  # refused before any key was looked up


async def test_algorithm_not_on_the_allowlist(verifier: JWTVerifier) -> None:
    token = hs(claims(), alg="HS512")
    await refused(verifier, bearer(token), 401, "invalid_token", "algorithm not allowed")


async def test_hs512_accepted_when_allowed(make_verifier: Factory) -> None:
    verifier = make_verifier(make_settings(jwt_algorithms=["HS512"]))
    assert (await verifier.authenticate(bearer(hs(claims(), alg="HS512")))).subject == SUBJECT
    await refused(
        verifier, bearer(hs(claims())), 401, "invalid_token", "algorithm not allowed"
    )  # HS256 is not on this allowlist


async def test_algorithm_must_fit_the_public_key(make_verifier: Factory) -> None:
    settings = make_settings(jwt_algorithms=["RS256", "ES256"], jwt_public_key=RSA_1.public_pem())
    verifier = make_verifier(settings)
    await refused(
        verifier,
        bearer(EC_1.sign(claims())),
        401,
        "invalid_token",
        "algorithm not allowed for this key",
    )


# --- registered claims --------------------------------------------------------------------


async def test_valid_hs256_token(verifier: JWTVerifier) -> None:
    principal = await verifier.authenticate(bearer(hs(claims())))
    assert principal == Principal(subject=SUBJECT, scopes=frozenset({"agents:query"}), agents=None)
    assert principal.may_use("anything")


async def test_expired(verifier: JWTVerifier) -> None:
    now = int(time.time())
    token = hs(claims(iat=now - 600, exp=now - int(LEEWAY) - 2))
    await refused(verifier, bearer(token), 401, "invalid_token", "token expired")


async def test_expired_within_leeway_is_accepted(verifier: JWTVerifier) -> None:
    now = int(time.time())
    token = hs(claims(iat=now - 600, exp=now - int(LEEWAY) + 2))
    assert (await verifier.authenticate(bearer(token))).subject == SUBJECT


async def test_zero_leeway(make_verifier: Factory) -> None:
    verifier = make_verifier(make_settings(jwt_leeway_seconds=0))
    now = int(time.time())
    token = hs(claims(iat=now - 600, exp=now - 2))
    await refused(verifier, bearer(token), 401, "invalid_token", "token expired")


async def test_not_yet_valid(verifier: JWTVerifier) -> None:
    now = int(time.time())
    token = hs(claims(nbf=now + int(LEEWAY) + 60))
    await refused(verifier, bearer(token), 401, "invalid_token", "token not yet valid")


async def test_nbf_within_leeway_is_accepted(verifier: JWTVerifier) -> None:
    now = int(time.time())
    token = hs(claims(nbf=now + int(LEEWAY) - 5))
    assert (await verifier.authenticate(bearer(token))).subject == SUBJECT


async def test_issued_in_the_future(verifier: JWTVerifier) -> None:
    now = int(time.time())
    token = hs(claims(iat=now + 3600, exp=now + 7200))
    await refused(verifier, bearer(token), 401, "invalid_token", "token not yet valid")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub"])
async def test_missing_required_claim(verifier: JWTVerifier, claim: str) -> None:
    token = hs(claims(**{claim: DROP}))
    await refused(verifier, bearer(token), 401, "invalid_token", f"missing claim: {claim}")


@pytest.mark.parametrize("sub", ["", "   ", 12345, ["a"], "x" * 300])
async def test_invalid_subject(verifier: JWTVerifier, sub: object) -> None:
    token = hs(claims(sub=sub))
    await refused(verifier, bearer(token), 401, "invalid_token", "invalid sub claim")


@pytest.mark.parametrize("exp", ["tomorrow", None])
async def test_non_numeric_exp(verifier: JWTVerifier, exp: object) -> None:
    token = hs(claims(exp=exp))
    expected = "missing claim: exp" if exp is None else "malformed token"
    await refused(verifier, bearer(token), 401, "invalid_token", expected)


@pytest.fixture
def strict_verifier(make_verifier: Factory) -> JWTVerifier:
    return make_verifier(make_settings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE))


async def test_issuer_and_audience_accepted(strict_verifier: JWTVerifier) -> None:
    for aud in (AUDIENCE, [AUDIENCE, "someone-else"]):
        token = hs(claims(iss=ISSUER, aud=aud))
        assert (await strict_verifier.authenticate(bearer(token))).subject == SUBJECT


async def test_wrong_issuer(strict_verifier: JWTVerifier) -> None:
    token = hs(claims(iss="https://evil.example", aud=AUDIENCE))
    await refused(strict_verifier, bearer(token), 401, "invalid_token", "wrong issuer")


async def test_wrong_audience(strict_verifier: JWTVerifier) -> None:
    token = hs(claims(iss=ISSUER, aud="another-api"))
    await refused(strict_verifier, bearer(token), 401, "invalid_token", "wrong audience")


@pytest.mark.parametrize("claim", ["iss", "aud"])
async def test_missing_issuer_or_audience(strict_verifier: JWTVerifier, claim: str) -> None:
    token = hs(claims(**{"iss": ISSUER, "aud": AUDIENCE, claim: DROP}))
    await refused(strict_verifier, bearer(token), 401, "invalid_token", f"missing claim: {claim}")


async def test_iss_and_aud_ignored_when_not_configured(verifier: JWTVerifier) -> None:
    token = hs(claims(iss="https://anyone.example", aud="whatever"))
    assert (await verifier.authenticate(bearer(token))).subject == SUBJECT


# --- scopes and agents --------------------------------------------------------------------


async def test_missing_scope_is_403_insufficient_scope(verifier: JWTVerifier) -> None:
    for token in (hs(claims(scope=DROP)), hs(claims(scope="agents:read other"))):
        exc = await refused(
            verifier, bearer(token), 403, "insufficient_scope", "token lacks the required scope"
        )
        assert exc.scope == "agents:query"
        assert exc.www_authenticate() == (
            'Bearer realm="agentserve", error="insufficient_scope", '
            'error_description="token lacks the required scope", scope="agents:query"'
        )


@pytest.mark.parametrize(
    "scope_claims",
    [
        {"scope": DROP, "scp": ["agents:query", "other"]},
        {"scope": DROP, "scp": "other agents:query"},
        {"scope": "other", "scp": ["agents:query"]},
    ],
)
async def test_scp_claim_accepted(verifier: JWTVerifier, scope_claims: dict[str, Any]) -> None:
    principal = await verifier.authenticate(bearer(hs(claims(**scope_claims))))
    assert {"agents:query", "other"} <= principal.scopes


@pytest.mark.parametrize(
    ("scope_claims", "description"),
    [
        ({"scope": ["agents:query"]}, "invalid scope claim"),
        ({"scope": DROP, "scp": [1, 2]}, "invalid scp claim"),
        ({"scope": DROP, "scp": {"a": 1}}, "invalid scp claim"),
    ],
)
async def test_scope_claims_of_the_wrong_type(
    verifier: JWTVerifier, scope_claims: dict[str, Any], description: str
) -> None:
    token = hs(claims(**scope_claims))
    await refused(verifier, bearer(token), 401, "invalid_token", description)


async def test_no_scope_required_when_setting_is_empty(make_verifier: Factory) -> None:
    verifier = make_verifier(make_settings(jwt_required_scope=""))
    principal = await verifier.authenticate(bearer(hs(claims(scope=DROP))))
    assert principal.scopes == frozenset()


async def test_agents_claim_parsed(verifier: JWTVerifier) -> None:
    principal = await verifier.authenticate(bearer(hs(claims(agents=["assistant", "coder"]))))
    assert principal.agents == frozenset({"assistant", "coder"})
    assert principal.may_use("assistant")
    assert not principal.may_use("calculator")
    empty = await verifier.authenticate(bearer(hs(claims(agents=[]))))
    assert empty.agents == frozenset()
    assert not empty.may_use("assistant")


async def test_agents_claim_name_is_configurable(make_verifier: Factory) -> None:
    verifier = make_verifier(make_settings(jwt_agents_claim="https://example.com/agents"))
    token = hs(claims(**{"https://example.com/agents": ["coder"], "agents": ["ignored"]}))
    assert (await verifier.authenticate(bearer(token))).agents == frozenset({"coder"})


@pytest.mark.parametrize("value", ["assistant", None, [1], {"assistant": True}])
async def test_agents_claim_of_the_wrong_type(verifier: JWTVerifier, value: object) -> None:
    token = hs(claims(agents=value))
    await refused(verifier, bearer(token), 401, "invalid_token", "invalid agents claim")


async def test_invalid_token_checked_before_scope(verifier: JWTVerifier) -> None:
    token = hs(claims(scope=DROP, agents="oops"))
    await refused(verifier, bearer(token), 401, "invalid_token", "invalid agents claim")


# --- public key (PEM) ---------------------------------------------------------------------


async def test_rs256_with_public_key_pem(make_verifier: Factory) -> None:
    verifier = make_verifier(
        make_settings(jwt_algorithms=["RS256"], jwt_public_key=RSA_1.public_pem())
    )
    principal = await verifier.authenticate(bearer(RSA_1.sign(claims(), kid=None)))
    assert principal.subject == SUBJECT
    assert verifier.status() == {"mode": "public_key", "keys": 1, "last_refresh_error": None}
    await refused(verifier, bearer(RSA_2.sign(claims())), 401, "invalid_token", "bad signature")


async def test_public_key_pem_on_one_line(make_verifier: Factory) -> None:
    one_line = RSA_1.public_pem().replace("\n", "\\n")
    verifier = make_verifier(make_settings(jwt_algorithms=["RS256"], jwt_public_key=one_line))
    assert (await verifier.authenticate(bearer(RSA_1.sign(claims())))).subject == SUBJECT


@pytest.mark.parametrize(
    ("pem", "algorithms", "message"),
    [
        ("not a pem", ["RS256"], "not a PEM public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", ["RS256"], "not a PEM"),
        (EC_1.public_pem(), ["RS256"], "does not fit"),
        (RSA_1.public_pem(), ["ES256"], "does not fit"),
    ],
)
def test_bad_public_key_fails_at_construction(
    pem: str, algorithms: list[str], message: str
) -> None:
    settings = make_settings(jwt_algorithms=algorithms, jwt_public_key=pem)
    with pytest.raises(ValueError, match=message):
        JWTVerifier(settings)


# --- JWKS ---------------------------------------------------------------------------------


async def test_es256_via_jwks(make_verifier: Factory, jwks: JWKSServer) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    principal = await verifier.authenticate(bearer(EC_1.sign(claims())))
    assert principal.subject == SUBJECT
    assert jwks.requests == 1
    assert verifier.status() == {"mode": "jwks", "keys": 2, "last_refresh_error": None}


async def test_jwks_is_cached(make_verifier: Factory, jwks: JWKSServer) -> None:
    clock = FakeClock()
    settings = jwks_settings(jwks, jwt_jwks_cache_seconds=300)
    verifier = make_verifier(settings, clock=clock, min_refresh_interval=0)
    await verifier.authenticate(bearer(RSA_1.sign(claims())))
    clock.advance(299)
    await verifier.authenticate(bearer(EC_1.sign(claims())))
    assert jwks.requests == 1
    clock.advance(2)  # the cache expired: fetched again
    await verifier.authenticate(bearer(RSA_1.sign(claims())))
    assert jwks.requests == 2


async def test_key_rotation_is_picked_up(make_verifier: Factory, jwks: JWKSServer) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    await verifier.authenticate(bearer(RSA_1.sign(claims())))
    jwks.keys = [RSA_2.public_jwk(), EC_1.public_jwk()]  # rsa-1 retired, rsa-2 new
    principal = await verifier.authenticate(bearer(RSA_2.sign(claims())))
    assert principal.subject == SUBJECT
    assert jwks.requests == 2


async def test_unknown_kid_refreshes_once_then_fails(
    make_verifier: Factory, jwks: JWKSServer
) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    await verifier.authenticate(bearer(RSA_1.sign(claims())))
    before = jwks.requests
    token = RSA_2.sign(claims(), kid="never-published")
    await refused(verifier, bearer(token), 401, "invalid_token", "unknown key id")
    assert jwks.requests == before + 1


async def test_unknown_kid_on_a_cold_cache_fetches_once(
    make_verifier: Factory, jwks: JWKSServer
) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    token = RSA_2.sign(claims())
    await refused(verifier, bearer(token), 401, "invalid_token", "unknown key id")
    assert jwks.requests == 1


async def test_refresh_is_rate_limited(make_verifier: Factory, jwks: JWKSServer) -> None:
    clock = FakeClock()
    verifier = make_verifier(jwks_settings(jwks), clock=clock, min_refresh_interval=10.0)
    await verifier.authenticate(bearer(RSA_1.sign(claims())))  # fetch 1
    clock.advance(11)
    await refused(verifier, bearer(RSA_2.sign(claims(), kid="k-a")), 401, "invalid_token")
    assert jwks.requests == 2  # the first unknown kid refreshed
    clock.advance(5)
    jwks.keys.append(RSA_2.public_jwk())
    await refused(verifier, bearer(RSA_2.sign(claims())), 401, "invalid_token", "unknown key id")
    assert jwks.requests == 2  # within the interval: no fetch
    clock.advance(6)
    assert (await verifier.authenticate(bearer(RSA_2.sign(claims())))).subject == SUBJECT
    assert jwks.requests == 3


async def test_concurrent_refreshes_coalesce(make_verifier: Factory, jwks: JWKSServer) -> None:
    jwks.delay = 0.2
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    tokens = [RSA_1.sign(claims()), EC_1.sign(claims())] * 5
    results = await asyncio.gather(*(verifier.authenticate(bearer(t)) for t in tokens))
    assert all(principal.subject == SUBJECT for principal in results)
    assert jwks.requests == 1


async def test_jwks_down_fails_closed(
    make_verifier: Factory, jwks: JWKSServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks.down = True
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    token = RSA_1.sign(claims())
    with caplog.at_level(logging.WARNING, logger="app.security.jwt"):
        await refused(verifier, bearer(token), 401, "invalid_token", "signing keys unavailable")
    assert verifier.status() == {"mode": "jwks", "keys": 0, "last_refresh_error": "HTTP 503"}
    assert "JWKS refresh failed: HTTP 503" in caplog.text
    assert token not in caplog.text
    jwks.down = False  # back: the next request fetches and succeeds
    assert (await verifier.authenticate(bearer(token))).subject == SUBJECT
    assert verifier.status()["last_refresh_error"] is None


async def test_jwks_unreachable_fails_closed(make_verifier: Factory, jwks: JWKSServer) -> None:
    url = f"http://127.0.0.1:{unused_port()}/jwks.json"
    verifier = make_verifier(jwks_settings(jwks, jwt_jwks_url=url), min_refresh_interval=0)
    await refused(
        verifier, bearer(RSA_1.sign(claims())), 401, "invalid_token", "signing keys unavailable"
    )
    assert verifier.status()["last_refresh_error"] == "ConnectError"


async def test_jwks_timeout_fails_closed(make_verifier: Factory, jwks: JWKSServer) -> None:
    jwks.delay = 1.0
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0, fetch_timeout=0.1)
    await refused(
        verifier, bearer(RSA_1.sign(claims())), 401, "invalid_token", "signing keys unavailable"
    )
    assert verifier.status()["last_refresh_error"] == "timeout"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b'["keys"]', "not a JWK set"),
        (b'{"keys": {}}', "not a JWK set"),
        (b'{"keys": []}', "no usable keys in the JWK set"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa-1"}]}', "no usable keys"),
    ],
)
async def test_unusable_jwks_fails_closed(
    make_verifier: Factory, jwks: JWKSServer, body: bytes, reason: str
) -> None:
    jwks.body = body
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    await refused(
        verifier, bearer(RSA_1.sign(claims())), 401, "invalid_token", "signing keys unavailable"
    )
    error = verifier.status()["last_refresh_error"]
    assert isinstance(error, str)
    assert error.startswith(reason)


async def test_failures_are_rate_limited_too(make_verifier: Factory, jwks: JWKSServer) -> None:
    clock = FakeClock()
    jwks.down = True
    verifier = make_verifier(jwks_settings(jwks), clock=clock, min_refresh_interval=10.0)
    token = bearer(RSA_1.sign(claims()))
    await refused(verifier, token, 401, "invalid_token", "signing keys unavailable")
    jwks.down = False
    await refused(verifier, token, 401, "invalid_token", "signing keys unavailable")
    assert jwks.requests == 1  # no hammering of the identity provider
    clock.advance(10)
    assert (await verifier.authenticate(token)).subject == SUBJECT
    assert jwks.requests == 2


async def test_expired_cache_with_jwks_down_fails_closed(
    make_verifier: Factory, jwks: JWKSServer
) -> None:
    clock = FakeClock()
    settings = jwks_settings(jwks, jwt_jwks_cache_seconds=60)
    verifier = make_verifier(settings, clock=clock, min_refresh_interval=0)
    token = bearer(RSA_1.sign(claims()))
    await verifier.authenticate(token)
    jwks.down = True
    clock.advance(61)
    await refused(verifier, token, 401, "invalid_token", "signing keys unavailable")


async def test_unknown_kid_while_jwks_down(make_verifier: Factory, jwks: JWKSServer) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    await verifier.authenticate(bearer(RSA_1.sign(claims())))
    jwks.down = True
    await refused(
        verifier, bearer(RSA_2.sign(claims())), 401, "invalid_token", "signing keys unavailable"
    )
    # The cached keys are still fresh: known kids keep working.
    assert (await verifier.authenticate(bearer(EC_1.sign(claims())))).subject == SUBJECT


async def test_token_without_kid_and_a_single_key(make_verifier: Factory, jwks: JWKSServer) -> None:
    jwks.keys = [RSA_1.public_jwk(with_kid=False)]
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    assert (await verifier.authenticate(bearer(RSA_1.sign(claims(), kid=None)))).subject
    await refused(
        verifier, bearer(RSA_2.sign(claims(), kid=None)), 401, "invalid_token", "bad signature"
    )


async def test_token_without_kid_and_several_keys(make_verifier: Factory, jwks: JWKSServer) -> None:
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    token = RSA_1.sign(claims(), kid=None)
    await refused(verifier, bearer(token), 401, "invalid_token", "token has no key id")
    await refused(verifier, bearer(token), 401, "invalid_token", "token has no key id")
    assert jwks.requests == 1  # a missing kid is not a reason to refresh


async def test_jwk_without_alg_serves_the_allowed_algorithms(
    make_verifier: Factory, jwks: JWKSServer
) -> None:
    jwks.keys = [RSA_1.public_jwk(with_alg=False)]
    settings = jwks_settings(jwks, jwt_algorithms=["RS256", "PS256"])
    verifier = make_verifier(settings, min_refresh_interval=0)
    ps256 = jwt.encode(claims(), RSA_1.private_key, algorithm="PS256", headers={"kid": "rsa-1"})
    assert (await verifier.authenticate(bearer(ps256))).subject == SUBJECT
    assert (await verifier.authenticate(bearer(RSA_1.sign(claims())))).subject == SUBJECT


async def test_jwk_alg_binds_the_key(make_verifier: Factory, jwks: JWKSServer) -> None:
    """A key published for RS256 does not verify PS256 tokens, even though both allowed."""
    settings = jwks_settings(jwks, jwt_algorithms=["RS256", "PS256"])
    verifier = make_verifier(settings, min_refresh_interval=0)
    ps256 = jwt.encode(claims(), RSA_1.private_key, algorithm="PS256", headers={"kid": "rsa-1"})
    await refused(
        verifier, bearer(ps256), 401, "invalid_token", "algorithm not allowed for this key"
    )


async def test_encryption_and_private_jwks_are_ignored(
    make_verifier: Factory, jwks: JWKSServer
) -> None:
    encryption = {**RSA_1.public_jwk(), "use": "enc"}
    assert isinstance(RSA_2.private_key, rsa.RSAPrivateKey)
    private = RSAAlgorithm.to_jwk(RSA_2.private_key, as_dict=True)
    private.update(kid=RSA_2.kid, alg="RS256")
    jwks.keys = [encryption, private, EC_1.public_jwk()]
    verifier = make_verifier(jwks_settings(jwks), min_refresh_interval=0)
    assert (await verifier.authenticate(bearer(EC_1.sign(claims())))).subject == SUBJECT
    assert verifier.status()["keys"] == 1
    await refused(verifier, bearer(RSA_1.sign(claims())), 401, "invalid_token", "unknown key id")
    await refused(verifier, bearer(RSA_2.sign(claims())), 401, "invalid_token", "unknown key id")


async def test_aclose_closes_only_its_own_client(jwks: JWKSServer) -> None:
    async with httpx.AsyncClient() as client:
        verifier = JWTVerifier(jwks_settings(jwks), http=client, min_refresh_interval=0)
        await verifier.authenticate(bearer(RSA_1.sign(claims())))
        await verifier.aclose()
        assert not client.is_closed
    own = JWTVerifier(jwks_settings(jwks), min_refresh_interval=0)
    await own.authenticate(bearer(RSA_1.sign(claims())))
    await own.aclose()
    await own.aclose()  # idempotent


# --- status, challenge, logs --------------------------------------------------------------


def test_status_modes(jwks: JWKSServer) -> None:
    assert JWTVerifier(make_settings()).status() == {
        "mode": "hmac",
        "keys": 1,
        "last_refresh_error": None,
    }
    assert JWTVerifier(jwks_settings(jwks)).status() == {
        "mode": "jwks",
        "keys": 0,
        "last_refresh_error": None,
    }


def test_challenge_parameters_are_sanitized() -> None:
    exc = AuthError(401, "invalid_token", 'bad "quoted"\\ \n text')
    assert exc.www_authenticate() == (
        'Bearer realm="agentserve", error="invalid_token", error_description="bad quoted  text"'
    )


async def test_no_token_or_claims_in_logs(
    verifier: JWTVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = [
        hs(claims(), OTHER_SECRET),
        hs(claims(exp=int(time.time()) - 3600)),
        hs(claims(scope=DROP)),
        hs(claims(agents="x")),
        f"{segment({'alg': 'none'})}.{segment(claims())}.",
    ]
    with caplog.at_level(logging.DEBUG, logger="app.security.jwt"):
        for token in tokens:
            with pytest.raises(AuthError):
                await verifier.authenticate(bearer(token))
    assert "bearer token refused" in caplog.text
    for token in tokens:
        assert token not in caplog.text
    assert SUBJECT not in caplog.text


# --- mint_token ---------------------------------------------------------------------------


async def test_mint_token_round_trips(make_verifier: Factory) -> None:
    settings = make_settings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    token = mint_token(
        settings,
        "alice",
        scopes=["agents:query", "extra:scope"],
        agents=["assistant"],
        extra={"team": "blue"},
    )
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert payload["iss"] == ISSUER
    assert payload["exp"] - payload["iat"] == 3600
    assert payload["team"] == "blue"
    principal = await make_verifier(settings).authenticate(bearer(token))
    assert principal == Principal(
        subject="alice",
        scopes=frozenset({"agents:query", "extra:scope"}),
        agents=frozenset({"assistant"}),
    )


async def test_minted_token_without_the_scope_is_403(verifier: JWTVerifier) -> None:
    for scopes in ((), ("",), ("other",)):
        token = mint_token(make_settings(), "alice", scopes=scopes)
        await refused(verifier, bearer(token), 403, "insufficient_scope")


def test_mint_token_normalizes_scopes() -> None:
    token = mint_token(make_settings(), "alice", scopes=["a b", "", " c "])
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["scope"] == "a b c"


def test_mint_token_refuses_production() -> None:
    settings = make_settings(app_env="production", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    with pytest.raises(ValueError, match="production"):
        mint_token(settings, "alice")


def test_mint_token_refuses_the_dev_secret() -> None:
    settings = make_settings(jwt_secret=DEV_JWT_SECRET)
    assert settings.uses_dev_secret
    with pytest.raises(ValueError, match=r"JWT_SECRET.*32 bytes.*token_urlsafe"):
        mint_token(settings, "alice")


@pytest.mark.parametrize(
    "overrides",
    [
        {"jwt_algorithms": ["RS256"], "jwt_public_key": RSA_1.public_pem()},
        {"jwt_algorithms": ["HS512"]},
    ],
)
def test_mint_token_refuses_without_hs256(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="HS256"):
        mint_token(make_settings(**overrides), "alice")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": " "},
        {"ttl_seconds": 0},
        {"scopes": "agents:query"},
        {"agents": "assistant"},
        {"extra": {"exp": 1}},
        {"extra": {"agents": ["x"]}},
    ],
)
def test_mint_token_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    subject = kwargs.pop("subject", "alice")
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        mint_token(make_settings(), subject, **kwargs)
