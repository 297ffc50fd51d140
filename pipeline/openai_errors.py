"""One reading of the `openai` client's errors for every OpenAI-compatible service okedit
calls (chat for annotation, images): which failures a later request may get past, which
are the item's own (a refusal, a bad request), and which no request can get past (wrong
credentials, wrong URL or model) so the build stops with what to fix."""

from __future__ import annotations

from dataclasses import dataclass

import openai

# error codes with which the images API refuses a prompt (HTTP 400)
REFUSAL_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
TRANSIENT_KINDS = frozenset({"rate_limited", "timeout", "connection", "server_error"})


@dataclass(frozen=True)
class APIFailure:
    """A failed request: its kind, a one-line reason, and, when no request can succeed, the
    message that says what to fix (`fatal`)."""

    kind: str  # rate_limited | timeout | connection | server_error | refusal | bad_request
    reason: str
    fatal: str | None = None

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


def classify_openai_error(exc: openai.APIError, service: str, fix_404: str) -> APIFailure:
    """The failure an error that survived the client's retries stands for. `service` names
    the server in messages ("the LLM server"); `fix_404` says what to check on a 404."""
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        fatal = f"{service} rejected the credentials (HTTP {exc.status_code}); check OPENAI_API_KEY"
        return APIFailure("bad_request", fatal, fatal)
    if isinstance(exc, openai.NotFoundError):
        fatal = f"{service} answered 404: {fix_404}"
        return APIFailure("bad_request", fatal, fatal)
    if isinstance(exc, openai.APITimeoutError):
        return APIFailure("timeout", "request timed out after all retries")
    if isinstance(exc, openai.APIConnectionError):
        return APIFailure(
            "connection", f"connection failed after all retries: {type(exc).__name__}"
        )
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc)
    return APIFailure("bad_request", f"{type(exc).__name__}: {short(str(exc))}")


def _status_failure(exc: openai.APIStatusError) -> APIFailure:
    status, message = exc.status_code, short(exc.message)
    if status == 429:
        return APIFailure("rate_limited", "HTTP 429 after all retries")
    if status >= 500 or status == 409:  # 409: a lock conflict on the server, retried
        return APIFailure("server_error", f"HTTP {status} after all retries")
    if status == 408:
        return APIFailure("timeout", "HTTP 408 after all retries")
    code = error_code(exc)
    if status == 400 and (code in REFUSAL_CODES or "safety" in message.lower()):
        return APIFailure(
            "refusal", f"the API refused the prompt ({code or 'HTTP 400'}): {message}"
        )
    return APIFailure("bad_request", f"HTTP {status}: {message}")


def error_code(exc: openai.APIStatusError) -> str:
    """The `error.code` of the response body ("" when there is none)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = getattr(exc, "code", None) or (error.get("code") if isinstance(error, dict) else None)
    return str(code or "")


def short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
