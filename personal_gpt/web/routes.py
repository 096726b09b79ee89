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
    return [Route("/api/health", health, methods=["GET"])]
