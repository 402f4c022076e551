"""Encrypted, authenticated links: CurveZMQ keys with an allow-list of device keys.

Optional: without keys the link is plain TCP (fine on loopback and in tests). With keys:

1. ``generate_keys(dir, "server")`` and ``generate_keys(dir, "device0")`` write ZeroMQ
   certificate files (``NAME.key`` public, ``NAME.key_secret`` secret; zmq.auth format).
2. The server runs with ``CurveServer.from_files("server.key_secret", ["device0.key", ...])``:
   every connection is encrypted, and a ZAP handler (pyzmq's ThreadAuthenticator) admits only
   the listed device public keys. A refused device never reaches the agent: the server keeps
   serving the others.
3. A device runs with ``CurveClient.from_files("device0.key_secret", "server.key")``; a refusal
   surfaces on the device as ``TransportError`` (the transport watches the handshake events).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from splitc import InputError
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["CurveClient", "CurveServer", "generate_keys", "start_authenticator"]


def generate_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write a keypair; return (public key file, secret key file)."""
    os.makedirs(directory, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    return Path(pub), Path(sec)


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise InputError(
            f"Security: cannot read key file {path} ({e}); create keys with generate_keys"
        ) from None


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    allow: frozenset[bytes]  # z85 public keys of the admitted devices

    @classmethod
    def from_files(cls, secret_file, allow_files) -> CurveServer:
        public, secret = _load(secret_file)
        if secret is None:
            raise InputError(f"Security: {secret_file} holds no secret key; pass NAME.key_secret")
        return cls(public, secret, frozenset(_load(f)[0] for f in allow_files))


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, secret_file, server_public_file) -> CurveClient:
        public, secret = _load(secret_file)
        if secret is None:
            raise InputError(f"Security: {secret_file} holds no secret key; pass NAME.key_secret")
        return cls(public, secret, _load(server_public_file)[0])


class _AllowList:
    def __init__(self, allow: frozenset[bytes]):
        self.allow = allow
        self.refused: list[bytes] = []

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allow
        if not ok:
            self.refused.append(key)
        return ok


def start_authenticator(ctx: zmq.Context, curve: CurveServer) -> ThreadAuthenticator:
    """Start a ZAP handler on ``ctx`` admitting only ``curve.allow``; caller stops it."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.allow_list = _AllowList(curve.allow)  # kept for tests and events
    auth.configure_curve_callback(domain="*", credentials_provider=auth.allow_list)
    return auth


def apply_server(sock: zmq.Socket, curve: CurveServer) -> None:
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_server = True


def apply_client(sock: zmq.Socket, curve: CurveClient) -> None:
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_serverkey = curve.server_public
