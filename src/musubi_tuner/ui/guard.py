"""Who may talk to the studio: the machine itself by default; other hosts (--listen) only with the token.

- Bound to loopback, requests must name a loopback Host (a web page elsewhere cannot reach the studio through
  DNS rebinding).
- With a token, every request carries it: once as `?token=...` (the URL the server prints, which then sets a
  cookie), or as `Authorization: Bearer ...`.
- Requests that change anything (POST) must carry the `X-Musubi-Studio` header, which a page of another site
  cannot add without the browser asking the studio first (and the studio never says yes): no cross-site requests.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

COOKIE = "musubi_studio_token"
HEADER = "x-musubi-studio"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class Guard:
    def __init__(self, app, *, token: str | None, loopback_only: bool):
        self.app, self.token, self.loopback_only = app, token, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.token and request.query_params.get("token"):  # the printed URL: keep the token in a cookie, not the address bar
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, request: Request):
        if self.loopback_only and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return PlainTextResponse("the studio answers on 127.0.0.1 only (start it with --listen to serve others)", 403)
        if self.token and not any(_same(self.token, supplied) for supplied in _tokens(request)):
            return PlainTextResponse("a token is needed: open the address musubi-ui printed (it ends in ?token=...)", 401)
        if request.method not in ("GET", "HEAD") and request.headers.get(HEADER) != "1":
            return PlainTextResponse(f"refused: requests that change things must come from the studio's pages ({HEADER} header)", 403)
        return None


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:7860
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _tokens(request: Request) -> list[str]:
    found = [request.query_params.get("token"), request.cookies.get(COOKIE)]
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        found.append(auth[7:].strip())
    return [t for t in found if t]


def _same(expected: str, supplied: str) -> bool:
    return hmac.compare_digest(expected.encode(), supplied.encode())
