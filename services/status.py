"""Structured gRPC errors: a status code, a message for people, and google.rpc details for programs.

Every llmrpc service ends a failed call the way Google APIs do (the gRPC richer error model):
the status message is readable as it stands (grpcurl prints it), and the
`grpc-status-details-bin` trailer carries a `google.rpc.Status` whose details say the same for
programs: a `google.rpc.BadRequest` naming the offending field for INVALID_ARGUMENT, a
`google.rpc.ErrorInfo` with a reason for the other codes a service raises itself. A service
that calls another passes that service's status on with its details intact (`relayed`), so a
field named by the scheduler reaches a gRPC or HTTP client of the tokenizer as the same field.

Servicer side: raise `FieldError(field, message)` (or `StatusError(code, message, reason=...)`)
below the handler, and in the handler `except StatusError as exc: await exc.abort(context)`.
Client side: `StatusError.of(rpc_error)` reads a failed call back (`.field`, `.field_violations`,
`.reason`); `bad_fields(rpc_error)` lists the fields it names. `StatusError.from_status` reads
back a grpc.Status (what a servicer context's abort_with_status was given).
"""
from __future__ import annotations

from typing import NoReturn, Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_DETAILS_KEY = "grpc-status-details-bin"  # the trailer rpc_status reads and writes

DOMAIN = "llmrpc.v1"  # ErrorInfo.domain: the reasons below are llmrpc's own

# The caller's own fault: a hop passes these on as they are. Any other status also says which
# hop it arose at ("scheduler at HOST:PORT: ..."), which an operator needs and a caller cannot fix.
CALLER_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
})


def _pack(detail: Message) -> any_pb2.Any:
    if isinstance(detail, any_pb2.Any):
        return detail  # relayed: kept byte for byte, whatever its type
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


class StatusError(Exception):
    """A call that ends in a gRPC status: its code, its readable message and its google.rpc details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = (),
                 *, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: list[any_pb2.Any] = [_pack(d) for d in details]
        if reason is not None:
            self.details.append(_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)))

    @property
    def field_violations(self) -> list[error_details_pb2.BadRequest.FieldViolation]:
        """Every BadRequest field violation in the details, in order."""
        violations = []
        for detail in self.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(bad.field_violations)
        return violations

    @property
    def field(self) -> str | None:
        """The first request field the status names as bad (a field path such as `sampling.top_p`)."""
        violations = self.field_violations
        return violations[0].field if violations else None

    @property
    def reason(self) -> str | None:
        """The ErrorInfo reason, when the status carries one."""
        for detail in self.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason
        return None

    def status(self) -> grpc.Status:
        """The grpc.Status to end a call with: code, message, and the google.rpc.Status trailer."""
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                      details=self.details))

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """Ends the servicer's call with this status (raises, as context.abort does)."""
        await context.abort_with_status(self.status())
        raise AssertionError("abort_with_status returned")  # it always raises

    def relayed(self, hop: str) -> StatusError:
        """This status as the caller of `hop` passes it on: details intact, the hop named unless the caller is at fault."""
        if self.code in CALLER_CODES:
            return self
        return StatusError(self.code, f"{hop}: {self.message}", self.details)

    @classmethod
    def from_status(cls, status: grpc.Status) -> StatusError:
        """The StatusError a grpc.Status stands for (the inverse of `status()`), details included."""
        for key, value in status.trailing_metadata or ():
            if key == _DETAILS_KEY:
                return cls(status.code, status.details, status_pb2.Status.FromString(value).details)
        return cls(status.code, status.details or "")

    @classmethod
    def of(cls, call: grpc.RpcError | grpc.aio.AioRpcError) -> StatusError:
        """The status a failed call ended with, with its details when it carried a google.rpc.Status."""
        try:
            rich = rpc_status.from_call(call)
        except ValueError:  # a proxy rewrote the code or message: what it says is what the caller saw
            rich = None
        return cls(call.code(), call.details() or "", rich.details if rich is not None else ())


class FieldError(StatusError):
    """INVALID_ARGUMENT naming one request field, as a google.rpc.BadRequest field violation.

    `field` is the path in the request message (`tokens.ids[3]`, `sampling.top_p`); `message`
    is the whole readable sentence, which starts with that path.
    """

    def __init__(self, field: str, message: str) -> None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message,
                         [error_details_pb2.BadRequest(field_violations=[violation])])


def bad_fields(call: grpc.RpcError | grpc.aio.AioRpcError) -> list[str]:
    """The request fields a failed call's status names as bad, in order (empty when it names none)."""
    return [v.field for v in StatusError.of(call).field_violations]
