"""botocore exceptions -> FetchError, with stable codes and no secret material in messages.

AWS error messages name principals, actions and resources, never values, so they are kept (they
say which IAM permission is missing); any token we sent is still scrubbed from them.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from providers.base import FetchError

NOT_FOUND = frozenset(
    {"ResourceNotFoundException", "ParameterNotFound", "ParameterVersionNotFound", "NotFound"}
)
DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "UnrecognizedClient",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "InvalidIdentityToken",
        "IDPRejectedClaim",
        "AuthFailure",
        "DecryptionFailure",  # Secrets Manager cannot use the KMS key: a permission problem
    }
)
# botocore's standard retry mode treats these as throttling (botocore/retries/standard.py).
THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "TooManyUpdates",
        "IDPCommunicationError",  # STS could not reach the OIDC provider: try later
    }
)
MAX_MESSAGE = 400


def redact(text: str, hide: tuple[str, ...]) -> str:
    for word in hide:
        if word:
            text = text.replace(word, "[REDACTED]")
    return text


def map_error(
    exc: BaseException,
    obj: str,
    region: str,
    action: str,
    *,
    noun: str = "secret",
    hide: tuple[str, ...] = (),
) -> FetchError:
    """A FetchError for ``exc`` raised by ``action`` (e.g. GetSecretValue) in ``region``."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        detail = redact(str(err.get("Message", "")), hide)[:MAX_MESSAGE]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        said = f"{code}: {detail}" if detail else code
        if code in NOT_FOUND:
            return FetchError(
                obj,
                f"{noun} not found in region {region} ({said})",
                transient=False,
                code="NotFound",
            )
        if code in DENIED:
            return FetchError(
                obj,
                f"{action} denied in region {region} ({said})",
                transient=False,
                code="AccessDenied",
            )
        if code in THROTTLED or status == 429:
            return FetchError(
                obj,
                f"{action} throttled in region {region} ({said})",
                transient=True,
                code="Throttled",
            )
        if status >= 500 or status == 0:
            return FetchError(
                obj,
                f"{action} failed in region {region} ({said})",
                transient=True,
                code="Unavailable",
            )
        return FetchError(
            obj,
            f"{action} rejected in region {region} ({said})",
            transient=False,
            code="BadRequest",
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return FetchError(
            obj,
            f"no usable AWS credentials for {action} in region {region}: set AWS_* variables, a "
            "profile or an instance role for the driver",
            transient=False,
            code="NoCredentials",
        )
    if isinstance(exc, ParamValidationError):
        detail = redact(str(exc), hide)[:MAX_MESSAGE]
        return FetchError(
            obj, f"{action} request invalid: {detail}", transient=False, code="BadRequest"
        )
    if isinstance(exc, ConnectionError | HTTPClientError | CredentialRetrievalError):
        detail = redact(str(exc), hide)[:MAX_MESSAGE]
        return FetchError(
            obj,
            f"{action} in region {region} could not complete: {detail}",
            transient=True,
            code="Unavailable",
        )
    if isinstance(exc, BotoCoreError):
        detail = redact(str(exc), hide)[:MAX_MESSAGE]
        return FetchError(
            obj,
            f"{action} in region {region} failed: {type(exc).__name__}: {detail}",
            transient=True,
            code="ProviderError",
        )
    return FetchError(
        obj,
        f"{action} in region {region} failed: {type(exc).__name__}",
        transient=True,
        code="ProviderError",
    )
