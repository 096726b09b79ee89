"""Our own HTTP routes, served by the same process and port as the Streamlit UI.

Nothing heavy is imported here: the first page render must not pay for torch.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from personal_gpt import __version__


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": __version__})


def routes() -> list[Route]:
    from personal_gpt.web.api import api_routes
    from personal_gpt.web.embed_routes import embed_routes
    from personal_gpt.web.oidc import auth_routes
    from personal_gpt.web.share_routes import share_routes

    return [
        Route("/api/health", health, methods=["GET"]), *share_routes(), *auth_routes(), *api_routes(),
        *embed_routes(),
    ]
