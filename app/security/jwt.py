"""Bearer-token (JWT) verification for /secure-query, following RFC 8725 and RFC 6750.

One `JWTVerifier` per process turns an ``Authorization`` header into a `Principal` or raises
`AuthError` (status, RFC 6750 error code, a description that never repeats the token or a
claim value, and the ``WWW-Authenticate`` challenge).

Keys come from exactly one source, picked from the settings:

* ``hmac``: ``JWT_SECRET`` when ``JWT_ALGORITHMS`` are HS*;
* ``public_key``: ``JWT_PUBLIC_KEY`` (a PEM public key or certificate), loaded once;
* ``jwks``: ``JWT_JWKS_URL``, fetched with httpx and cached for ``JWT_JWKS_CACHE_SECONDS``.
  An unknown ``kid`` triggers one refresh (shared by concurrent requests, at most one per
  ``min_refresh_interval``); when the set cannot be fetched the verifier fails closed.

A token's ``alg`` must be on the ``JWT_ALGORITHMS`` allowlist *and* fit the key's type, so
neither ``none`` nor an HS256 token "signed" with the RSA public key (key confusion) passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import httpx
import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from app.config import HMAC_ALGORITHMS, Settings
from app.errors import AppError

__all__ = [
    "DEFAULT_MIN_REFRESH_INTERVAL",
    "JWKS_FETCH_TIMEOUT",
    "AuthError",
    "JWTVerifier",
    "Principal",
    "mint_token",
]

log = logging.getLogger(__name__)

DEFAULT_MIN_REFRESH_INTERVAL = 10.0
"""Seconds between two JWKS fetch attempts (unknown ``kid``s, failures), across requests."""
JWKS_FETCH_TIMEOUT = 3.0
"""Whole-fetch deadline for the JWKS document, seconds."""
MAX_JWKS_BYTES = 512 * 1024
"""A larger JWKS answer is refused (treated as unavailable)."""
MAX_TOKEN_CHARS = 8192
"""Longer bearer tokens are refused before any parsing."""
MAX_SUBJECT_CHARS = 255
"""The sessions.owner column holds 255 characters."""

_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 section 2.1: ``b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" )
*"="``."""
_UNSAFE_PARAM_CHARS = re.compile(r'[^\x20-\x7e]|["\\]')
"""Characters not allowed in an RFC 6750 error_description or scope value."""

_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_PREFIXES = ("RS", "PS")
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
"""RFC 7518 section 3.2: an HMAC key at least as long as the hash output."""

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
Mode = Literal["hmac", "public_key", "jwks"]


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called, with what scopes, and which agents they may use (None: any agent)."""

    subject: str
    scopes: frozenset[str]
    agents: frozenset[str] | None

    def may_use(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents


class AuthError(AppError):
    """A refused request: 401 (no/invalid credentials) or 403 (insufficient scope).

    ``error`` is the RFC 6750 code, or ``""`` when no credentials were sent at all (then the
    challenge carries no error, RFC 6750 section 3.1). ``description`` is short and safe to
    show: it never contains the token or a claim value.
    """

    status: int
    error: str
    description: str
    scope: str | None

    def __init__(
        self, status: int, error: str, description: str, *, scope: str | None = None
    ) -> None:
        self.error = error
        self.description = description
        self.scope = scope
        super().__init__(description, headers={"WWW-Authenticate": self.www_authenticate()})
        self.status = status
        self.code = error or "unauthorized"

    def www_authenticate(self, realm: str = "agentserve") -> str:
        params = [f'realm="{_param(realm)}"']
        if self.error:
            params.append(f'error="{self.error}"')
            if self.description:
                params.append(f'error_description="{_param(self.description)}"')
            if self.scope:
                params.append(f'scope="{_param(self.scope)}"')
        return "Bearer " + ", ".join(params)

    def __repr__(self) -> str:
        return f"AuthError({self.status}, {self.error!r}, {self.description!r})"


def _param(value: str) -> str:
    return _UNSAFE_PARAM_CHARS.sub("", value)


def _invalid(description: str) -> AuthError:
    return AuthError(401, "invalid_token", description)


# --- key handling -------------------------------------------------------------------------


def _key_fits(alg: str, key: object) -> bool:
    """Whether `alg` may be verified with `key` (a cryptography public key object)."""
    if alg.startswith(_RSA_PREFIXES):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def _load_public_key(pem: str) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo) or X.509 certificate; literal ``\\n`` (a PEM
    squeezed into one environment-variable line) is accepted."""
    data = pem.strip().replace("\\n", "\n").encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("JWT_PUBLIC_KEY is not a PEM public key or certificate") from None
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError("JWT_PUBLIC_KEY has an unsupported key type")
    return key


@dataclass(frozen=True, slots=True)
class _JWK:
    kid: str | None
    by_alg: Mapping[str, jwt.PyJWK]
    """One PyJWK per allowed algorithm this key may verify (PyJWT then insists on it)."""


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_JWK, ...]
    fetched_at: float

    def find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key for a token; None when its `kid` is not in the set (worth a refresh)."""
        if kid is None:
            if len(self.keys) != 1:
                raise _invalid("token has no key id")
            candidates = list(self.keys)
        else:
            candidates = [key for key in self.keys if key.kid == kid]
            if not candidates:
                return None
        for candidate in candidates:
            if alg in candidate.by_alg:
                return candidate.by_alg[alg]
        raise _invalid("algorithm not allowed for this key")


class _JWKSError(Exception):
    """The JWKS could not be fetched or used; the message is safe to log and report."""


def _parse_jwks(data: object, algorithms: Sequence[str]) -> tuple[_JWK, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise _JWKSError("not a JWK set")
    keys: list[_JWK] = []
    for raw in data["keys"]:
        if not isinstance(raw, dict):
            continue
        if raw.get("use", "sig") != "sig" or "d" in raw or raw.get("kty") == "oct":
            continue  # encryption keys, private or symmetric material: never for verifying
        ops = raw.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        kid = raw.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        declared = raw.get("alg")
        candidates = [alg for alg in algorithms if declared is None or alg == declared]
        by_alg: dict[str, jwt.PyJWK] = {}
        for alg in candidates:
            try:
                jwk = jwt.PyJWK.from_dict(raw, algorithm=alg)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            if _key_fits(alg, jwk.key):
                by_alg[alg] = jwk
        if by_alg:
            keys.append(_JWK(kid=kid, by_alg=by_alg))
    if not keys:
        raise _JWKSError("no usable keys in the JWK set")
    return tuple(keys)


# --- the verifier -------------------------------------------------------------------------


_FAILURES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuedAtError, "invalid iat claim"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (InvalidSubjectError, "invalid sub claim"),
    (InvalidJTIError, "invalid jti claim"),
    (jwt.InvalidKeyError, "key does not fit the algorithm"),
    (jwt.DecodeError, "malformed token"),
)


def _describe(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim: {exc.claim}"  # the claim's name, from our own list
    for kind, description in _FAILURES:
        if isinstance(exc, kind):
            return description
    return "invalid token"


def _bearer_token(authorization: str | None) -> str:
    if authorization is None:
        raise AuthError(401, "", "bearer token required")
    scheme, _, rest = authorization.strip().partition(" ")
    token = rest.lstrip(" ")
    if scheme.lower() != "bearer" or not _B64TOKEN.fullmatch(token):
        raise AuthError(401, "invalid_request", "expected 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise _invalid("token too large")
    return token


class JWTVerifier:
    """Verifies bearer tokens against the configured keys; one per process."""

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
        fetch_timeout: float = JWKS_FETCH_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._algorithms = tuple(settings.jwt_algorithms)
        self._clock = clock
        self._min_refresh_interval = min_refresh_interval
        self._fetch_timeout = fetch_timeout
        self._http = http
        self._owns_http = False
        self._required_scopes = frozenset(settings.jwt_required_scope.split())
        self._secret = b""
        self._public_key: PublicKey | None = None
        self._jwks_url = ""
        self._keyset: _KeySet | None = None
        self._last_attempt: float | None = None
        self._last_refresh_error: str | None = None
        self._refresh_task: asyncio.Task[None] | None = None

        self.mode: Mode
        if settings.uses_hmac:
            self.mode = "hmac"
            self._secret = settings.jwt_secret.get_secret_value().encode()
            for alg in sorted(set(self._algorithms) & HMAC_ALGORITHMS):
                digest = _HMAC_KEY_BYTES[alg]
                if len(self._secret) < digest:
                    log.warning("JWT_SECRET is shorter than the %d bytes %s wants", digest, alg)
        elif settings.jwt_public_key is not None:
            self.mode = "public_key"
            key = _load_public_key(settings.jwt_public_key.get_secret_value())
            if not any(_key_fits(alg, key) for alg in self._algorithms):
                raise ValueError("JWT_PUBLIC_KEY does not fit any of JWT_ALGORITHMS")
            if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
                log.warning("JWT_PUBLIC_KEY is a %d-bit RSA key (2048+ wanted)", key.key_size)
            self._public_key = key
            if settings.jwt_jwks_url is not None:
                log.warning("JWT_PUBLIC_KEY and JWT_JWKS_URL are both set; using the PEM key")
        elif settings.jwt_jwks_url is not None:
            self.mode = "jwks"
            self._jwks_url = str(settings.jwt_jwks_url)
        else:  # Settings refuses this already
            raise ValueError("public-key JWT_ALGORITHMS need JWT_PUBLIC_KEY or JWT_JWKS_URL")

    # --- public API -----------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization`` header value; raises `AuthError`."""
        try:
            token = _bearer_token(authorization)
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                raise _invalid("malformed token") from None
        except AuthError as exc:
            log.debug("bearer token refused: %s", exc.description)
            raise
        alg = header.get("alg")
        kid = header.get("kid")
        try:
            if not isinstance(alg, str) or alg not in self._algorithms:
                raise _invalid("algorithm not allowed")
            if kid is not None and not isinstance(kid, str):
                raise _invalid("malformed token")
            claims = self._decode(token, await self._key(alg, kid), alg)
            return self._principal(claims)
        except AuthError as exc:
            log.debug("bearer token refused: %s (alg=%.16r, kid=%.64r)", exc.description, alg, kid)
            raise

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None
            self._owns_http = False

    def status(self) -> dict[str, object]:
        if self.mode == "jwks":
            keys = len(self._keyset.keys) if self._keyset is not None else 0
        else:
            keys = 1
        return {"mode": self.mode, "keys": keys, "last_refresh_error": self._last_refresh_error}

    # --- verification ---------------------------------------------------------------------

    async def _key(self, alg: str, kid: str | None) -> PublicKey | jwt.PyJWK | bytes:
        if self.mode == "hmac":
            if alg not in HMAC_ALGORITHMS:  # unreachable while the allowlist is pure HS*
                raise _invalid("algorithm not allowed for this key")
            return self._secret
        if self.mode == "public_key":
            assert self._public_key is not None
            if not _key_fits(alg, self._public_key):
                raise _invalid("algorithm not allowed for this key")
            return self._public_key
        return await self._jwks_key(alg, kid)

    def _decode(self, token: str, key: PublicKey | jwt.PyJWK | bytes, alg: str) -> dict[str, Any]:
        settings = self._settings
        required = ["exp", "iat", "sub"]
        if settings.jwt_issuer:
            required.append("iss")
        if settings.jwt_audience:
            required.append("aud")
        options: Options = {"require": required, "verify_aud": bool(settings.jwt_audience)}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=options,
                leeway=settings.jwt_leeway_seconds,
                issuer=settings.jwt_issuer or None,
                audience=settings.jwt_audience or None,
            )
        except jwt.PyJWTError as exc:
            raise _invalid(_describe(exc)) from None
        except (ValueError, TypeError, OverflowError):
            raise _invalid("malformed token") from None
        return claims

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not subject.strip()
            or len(subject) > MAX_SUBJECT_CHARS
            or "\x00" in subject
        ):
            raise _invalid("invalid sub claim")

        scopes: set[str] = set()
        if "scope" in claims:
            scope = claims["scope"]
            if not isinstance(scope, str):
                raise _invalid("invalid scope claim")
            scopes.update(scope.split())
        if "scp" in claims:
            scp = claims["scp"]
            if isinstance(scp, str):
                scopes.update(scp.split())
            elif isinstance(scp, list) and all(isinstance(item, str) for item in scp):
                scopes.update(scp)
            else:
                raise _invalid("invalid scp claim")

        agents: frozenset[str] | None = None
        name = self._settings.jwt_agents_claim
        if name in claims:
            value = claims[name]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise _invalid(f"invalid {name} claim")
            agents = frozenset(value)

        if not self._required_scopes <= scopes:
            raise AuthError(
                403,
                "insufficient_scope",
                "token lacks the required scope",
                scope=self._settings.jwt_required_scope.strip(),
            )
        return Principal(subject=subject, scopes=frozenset(scopes), agents=agents)

    # --- JWKS -----------------------------------------------------------------------------

    def _fresh_keyset(self) -> _KeySet | None:
        keyset = self._keyset
        if keyset is None:
            return None
        age = self._clock() - keyset.fetched_at
        return keyset if 0 <= age < self._settings.jwt_jwks_cache_seconds else None

    def _may_fetch(self) -> bool:
        """Rate limit: one attempt per `min_refresh_interval`, unless the cache just expired
        after a successful fetch (then the cache lifetime is what counts)."""
        if self._last_attempt is None:
            return True
        since = self._clock() - self._last_attempt
        if not 0 <= since < self._min_refresh_interval:
            return True
        return self._last_refresh_error is None and self._fresh_keyset() is None

    async def _jwks_key(self, alg: str, kid: str | None) -> jwt.PyJWK:
        keyset = self._fresh_keyset()
        if keyset is not None:
            key = keyset.find(kid, alg)
            if key is not None:
                return key
        # Cache cold or expired, or an unknown kid: at most one fetch for this request,
        # shared with every request that needs one meanwhile.
        task = self._refresh_task
        if task is None or task.done():
            task = None
            if self._may_fetch():
                task = asyncio.create_task(self._refresh(), name="jwks-refresh")
                self._refresh_task = task
        if task is not None:
            await asyncio.shield(task)  # a cancelled request does not cancel the fetch
        keyset = self._fresh_keyset()
        if keyset is None:
            raise _invalid("signing keys unavailable")
        key = keyset.find(kid, alg)
        if key is None:
            failed = self._last_refresh_error is not None
            raise _invalid("signing keys unavailable" if failed else "unknown key id")
        return key

    async def _refresh(self) -> None:
        self._last_attempt = self._clock()
        try:
            async with asyncio.timeout(self._fetch_timeout):
                keys = _parse_jwks(await self._fetch(), self._algorithms)
        except TimeoutError:
            self._refresh_failed("timeout")
        except _JWKSError as exc:
            self._refresh_failed(str(exc))
        else:
            self._keyset = _KeySet(keys=keys, fetched_at=self._clock())
            self._last_refresh_error = None
            log.debug("JWKS refreshed: %d usable keys", len(keys))

    def _refresh_failed(self, reason: str) -> None:
        self._last_refresh_error = reason
        log.warning("JWKS refresh failed: %s", reason)

    async def _fetch(self) -> object:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._fetch_timeout, follow_redirects=False)
            self._owns_http = True
        body = bytearray()
        try:
            async with self._http.stream(
                "GET",
                self._jwks_url,
                headers={"Accept": "application/json"},
                timeout=self._fetch_timeout,
            ) as response:
                if not response.is_success:
                    raise _JWKSError(f"HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _JWKSError("JWK set too large")
        except httpx.TimeoutException:
            raise _JWKSError("timeout") from None
        except httpx.HTTPError as exc:
            raise _JWKSError(type(exc).__name__) from None
        try:
            data: object = json.loads(body)
        except ValueError:
            raise _JWKSError("invalid JSON") from None
        return data


# --- development tokens -------------------------------------------------------------------


def mint_token(
    settings: Settings,
    subject: str,
    *,
    scopes: Sequence[str] = ("agents:query",),
    ttl_seconds: int = 3600,
    agents: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A development token signed with the configured HS256 secret (``agentserve token``).

    Refuses (ValueError) in production mode, with the default development secret, and when
    HS256 is not among ``JWT_ALGORITHMS``.
    """
    if settings.app_env == "production":
        raise ValueError("refusing to mint development tokens in production mode")
    if "HS256" not in settings.jwt_algorithms:
        raise ValueError("minting development tokens needs HS256 in JWT_ALGORITHMS")
    if settings.uses_dev_secret:
        raise ValueError(
            "refusing to mint with the default development JWT_SECRET; set JWT_SECRET to a "
            "random value of at least 32 bytes, e.g. the output of "
            '`python -c "import secrets; print(secrets.token_urlsafe(48))"`'
        )
    if not subject.strip():
        raise ValueError("subject must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    if isinstance(scopes, str) or isinstance(agents, str):
        raise ValueError("scopes and agents are sequences of names, not one string")

    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + ttl_seconds}
    scope = " ".join(part for item in scopes for part in item.split())  # "" and "a b" too
    if scope:
        claims["scope"] = scope
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if agents is not None:
        claims[settings.jwt_agents_claim] = list(agents)
    if extra:
        reserved = {*claims, "sub", "iat", "exp", "scope", "iss", "aud", settings.jwt_agents_claim}
        clash = sorted(set(extra) & reserved)
        if clash:
            raise ValueError(f"extra claims would override {', '.join(clash)}")
        claims.update(extra)
    secret = settings.jwt_secret.get_secret_value()
    return jwt.encode(claims, secret, algorithm="HS256")
