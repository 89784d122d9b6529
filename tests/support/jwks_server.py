"""A tiny JWKS endpoint in a real uvicorn server, and signing keys to put in it.

Usage::

    signing = rsa_key("k1")
    with running_jwks_server([signing.public_jwk()]) as server:
        settings = Settings(_env_file=None, jwt_algorithms=["RS256"], jwt_jwks_url=server.url)
        token = signing.sign({"sub": "alice", ...})
        server.keys.append(rsa_key("k2").public_jwk())   # rotate
        server.down = True                              # answer 503 from now on
        assert server.requests == 1

Like `tests.support.simserver`, the server runs in a background thread with its own event loop on a
socket bound to port 0 before the thread starts. The knobs are plain attributes of
`JWKSServer`, read by the server thread on every request (single assignments, GIL-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.threaded_server import serve_in_thread

__all__ = [
    "JWKS_PATH",
    "JWKSServer",
    "SigningKey",
    "ec_key",
    "rsa_key",
    "running_jwks_server",
]

JWKS_PATH = "/.well-known/jwks.json"


# --- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its `kid` and `alg`: signs tokens, exports its public half."""

    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)

    def public_jwk(self, *, with_kid: bool = True, with_alg: bool = True) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk["use"] = "sig"
        if with_kid:
            jwk["kid"] = self.kid
        if with_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        kid: str | None = "",
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token over `claims`; `kid` defaults to this key's (None: no kid header)."""
        header: dict[str, Any] = dict(headers or {})
        if kid is not None:
            header["kid"] = kid or self.kid
        return jwt.encode(dict(claims), self.private_key, algorithm=self.alg, headers=header)


def rsa_key(kid: str = "rsa-1", alg: str = "RS256") -> SigningKey:
    """A fresh RSA-2048 key (about 50-100 ms to generate: reuse them across tests)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(kid=kid, alg=alg, private_key=private)


def ec_key(kid: str = "ec-1", alg: str = "ES256") -> SigningKey:
    """A fresh EC key on the curve `alg` wants (P-256 for ES256)."""
    curve: ec.EllipticCurve = {
        "ES256": ec.SECP256R1(),
        "ES384": ec.SECP384R1(),
        "ES512": ec.SECP521R1(),
    }[alg]
    return SigningKey(kid=kid, alg=alg, private_key=ec.generate_private_key(curve))


# --- the server ---------------------------------------------------------------------------


@dataclass(slots=True)
class JWKSServer:
    """The running server and its knobs (change them from the test at any time)."""

    host: str
    port: int
    keys: list[dict[str, Any]] = field(default_factory=list)
    """Served as ``{"keys": [...]}``; mutate or replace to rotate keys."""
    requests: int = 0
    """JWKS requests answered so far (any outcome)."""
    down: bool = False
    """True: answer 503."""
    body: bytes | None = None
    """When set, served verbatim (as application/json) instead of the key list."""
    delay: float = 0.0
    """Seconds to wait before answering (to make requests overlap)."""
    server: uvicorn.Server | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{JWKS_PATH}"

    def reset(self, keys: list[dict[str, Any]] | None = None) -> None:
        """Back to a healthy server serving `keys`, with the request count at zero."""
        self.keys = list(keys or [])
        self.down = False
        self.body = None
        self.delay = 0.0
        self.requests = 0

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.requests += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.down:
                return JSONResponse({"detail": "down"}, status_code=503)
            if self.body is not None:
                return Response(self.body, media_type="application/json")
            return JSONResponse({"keys": list(self.keys)})

        return Starlette(routes=[Route(JWKS_PATH, jwks)])


@contextlib.contextmanager
def running_jwks_server(keys: list[dict[str, Any]] | None = None) -> Iterator[JWKSServer]:
    """Serve a JWKS on 127.0.0.1:<free port> for the duration of the block."""
    holder: list[JWKSServer] = []

    def make_app(port: int) -> Starlette:
        holder.append(JWKSServer(host="127.0.0.1", port=port, keys=list(keys or [])))
        return holder[0].app()

    with serve_in_thread(make_app, "JWKS") as (server, _port):
        state = holder[0]
        state.server = server
        yield state
