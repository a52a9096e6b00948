"""What a bad request gets: a 4xx JSON answer naming the field and the fix, never a traceback."""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake: ``status`` (4xx), the ``field`` at fault and what is wrong with it."""

    status = 400

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def body(self) -> dict:
        return {"detail": f"{self.field}: {self.problem}", "field": self.field}


class BadRequest(RequestError):
    status = 400


class NotFound(RequestError):
    status = 404


class TooLarge(RequestError):
    status = 413


class Unauthorized(RequestError):
    status = 401
