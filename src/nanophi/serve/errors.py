"""`APIError`: a request the server refuses, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send back."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
