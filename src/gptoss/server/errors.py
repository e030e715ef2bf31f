"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad input (naming the
parameter), 401 for a wrong API key, 404 for unknown routes, 413 for a body over the limit, 503 when the
engine is full or shutting down."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _param(loc: tuple, data: Any, keep_last: bool) -> str:
    """pydantic's error location as an OpenAI parameter path (messages[0].content), walking the request's own
    data: segments that are not keys or indices of it (union members such as 'str' or 'list[...]', tags of a
    discriminated union) are pydantic's, not the caller's, and are left out."""
    out = ""
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(data, dict) and isinstance(part, str) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif not (last and keep_last):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(e: ValidationError, data: Any) -> APIError:
    """The most specific of pydantic's errors (the deepest location: for a union, the member that got
    furthest) as a 400 naming the parameter."""
    err = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
    missing = err["type"] == "missing"
    param = _param(err["loc"], data, keep_last=missing) or None
    if missing:
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if err["type"] == "union_tag_invalid":  # an input item of an unknown type
        param = f"{param}.type"
        return bad_request(f"Invalid value for '{param}': {err['ctx']['tag']!r}; supported: "
                           f"{err['ctx']['expected_tags']}.", param)
    where = f"'{param}'" if param else "the request body"
    # a validator's own ValueError: its words, without pydantic's "Value error, " in front
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
    return bad_request(f"Invalid value for {where}: {msg}.", param)
