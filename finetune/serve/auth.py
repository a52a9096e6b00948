"""Who may use the server: one bearer token (``--token`` or ``SAMTUNE_SERVE_TOKEN``).

3D Slicer's MONAI Label module logs in the way MONAI Label's server asks: ``GET /auth/`` answers
``{"enabled": true}``, the module asks the user for a name and password and ``POST``s them to
``/auth/token`` as an OAuth2 password form, and sends the ``access_token`` it gets back as
``Authorization: Bearer`` from then on. Here the password is the server's token (any user name):
the login hands the same token back, so a script can skip the form and send the header directly.
Tokens are compared in constant time (``hmac.compare_digest``). Without a token every route is
open, which is safe only on the loopback interface (the CLI warns otherwise).
"""

from __future__ import annotations

import hmac

from samtune.finetune.serve.errors import Unauthorized

TOKEN_ENV = "SAMTUNE_SERVE_TOKEN"


class Auth:
    def __init__(self, token: str | None):
        self.token = token or None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def _same(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def check_header(self, authorization: str | None) -> None:
        """Every route but ``/info/`` and ``/auth/``: the bearer token or a 401."""
        if not self.enabled:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given or not self._same(given.strip()):
            raise Unauthorized("Authorization", "send 'Authorization: Bearer <token>' (POST /auth/token with the server's token as password returns it)")

    def login(self, username: str, password: str) -> dict:
        """``POST /auth/token``: the OAuth2 password form; the password is the server's token."""
        if not self.enabled:
            return {"access_token": None, "token_type": None}  # what MONAI Label answers with auth off
        if not password or not self._same(password):
            raise Unauthorized("password", "wrong password: it is the token samtune serve was started with")
        return {"access_token": self.token, "token_type": "bearer"}

    def info(self) -> dict:
        return {"enabled": self.enabled, "client_id": "samtune", "realm": None}
