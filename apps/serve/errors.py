"""The errors a serving client gets, with TensorFlow Serving's codes and HTTP statuses.

TensorFlow Serving answers every failed REST call with `{"error": message}`
and the HTTP status its canonical error code maps to
(`tensorflow_serving/model_servers/http_server.cc: ToHTTPStatusCode`); the
table below is that mapping, so a client sees the same status from either
server for the same mistake.
"""

# Canonical error code name -> HTTP status, as TensorFlow Serving maps them.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request the server cannot answer, as TensorFlow Serving would refuse it.

    Args:
        message: the text of the `error` field.
        code: a canonical error code name (a key of HTTP_STATUS).
        http_status: overrides the status the code maps to (413 for a body
            over the limit, which TensorFlow Serving leaves to its HTTP layer).
    """

    def __init__(self, message, *, code="INVALID_ARGUMENT", http_status=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def invalid(message):
    return ServingError(message, code="INVALID_ARGUMENT")


def not_found(message):
    return ServingError(message, code="NOT_FOUND")
