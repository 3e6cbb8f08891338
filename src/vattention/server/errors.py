"""Errors in OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, and the bearer-key
check. Whatever goes wrong, the client gets the envelope and never a stack trace: the traceback of
an unexpected error goes to the server log only.

    APIError (protocol.py)             -> its status
    RequestError (engine/validation)   -> 400 with its param and code (a limit the request broke)
    malformed JSON, invalid fields     -> 400, param = the first offending field
    unknown route / method             -> 404 / 405
    the client left while sending      -> one info line in the log, no response (499)
    anything else                      -> 500
"""

from __future__ import annotations

import logging
import secrets
from typing import TypeVar

from fastapi import FastAPI, Header
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.validation import RequestError
from .protocol import APIError, ErrorResponse

log = logging.getLogger("vattention.server")
T = TypeVar("T", bound=BaseModel)


async def parse_body(request: HTTPRequest, model: type[T]) -> T:
    """The JSON body as `model`, whatever the content-type says (curl -d sends form-urlencoded)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def bearer_check(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(authorization: str | None = Header(default=None)) -> None:
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    return check


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestError)
    async def over_a_limit(request: HTTPRequest, e: RequestError) -> JSONResponse:
        return _error_response(APIError(400, str(e), param=e.param, code=e.code))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: HTTPRequest, e: ClientDisconnect) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected before sending all of %s %s", client, request.method,
                 request.url.path)
        return Response(status_code=499)  # nobody reads it; the access log shows what happened

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "Internal server error; the server log has the "
                                             "details.", type="server_error"))


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=e.info).model_dump(), status_code=e.status)


def validation_error(errors) -> APIError:
    """The first offending field as `param`, with every complaint about it in the message."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json")
    path = [str(p) for p in first["loc"] if p != "body"]
    if not path:
        return APIError(400, f"The request body is invalid: {first['msg']}")
    param = path[0]
    if first["type"] == "extra_forbidden":
        name = ".".join(path)
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    complaints = []
    for err in errors:
        loc = [str(p) for p in err["loc"] if p != "body"]
        text = f"{'.'.join(loc)}: {err['msg']}"
        if loc[:1] == [param] and text not in complaints:
            complaints.append(text)
    return APIError(400, "Invalid request: " + "; ".join(complaints[:4]), param=param)
