"""Reading Secrets Manager secrets and SSM parameters in one region."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from providers.aws.auth import ClientCache
from providers.aws.errors import map_error
from providers.aws.params import SECRETSMANAGER, AwsAuth, AwsSource, Target
from providers.base import Fetched, FetchError, Identity

SSM_BATCH = 10  # GetParameters takes at most 10 names per call

Result = Fetched | FetchError


def retarget(err: FetchError, obj: str) -> FetchError:
    """The same failure, reported for another object."""
    msg = str(err).removeprefix(f"object {err.obj!r}: ")
    return FetchError(obj, msg, transient=err.transient, code=err.code)


def target_of(src: AwsSource, failover: bool) -> Target:
    if failover and src.failover is not None:
        return src.failover
    return src.primary


def fetch_region(
    clients: ClientCache,
    auth: AwsAuth,
    identity: Identity,
    region: str,
    failover: bool,
    sources: Sequence[AwsSource],
) -> dict[AwsSource, Result]:
    """One result per source, read from ``region`` (failover targets if ``failover``)."""
    if not sources:
        return {}
    try:
        creds = clients.credentials(auth, identity, region, sources[0].name)
    except FetchError as err:
        return {s: retarget(err, s.name) for s in sources}
    results: dict[AwsSource, Result] = {}
    secrets = [s for s in sources if s.kind == SECRETSMANAGER]
    params = [s for s in sources if s.kind != SECRETSMANAGER]
    if secrets:
        sm = clients.client("secretsmanager", region, creds)
        for s in secrets:
            results[s] = get_secret(sm, s, region, failover)
    if params:
        ssm = clients.client("ssm", region, creds)
        for batch in ssm_batches(params, failover):
            results.update(get_parameters(ssm, batch, region, failover))
    return results


def get_secret(sm: Any, src: AwsSource, region: str, failover: bool) -> Result:
    t = target_of(src, failover)
    kwargs = {"SecretId": t.name}
    if t.version:
        kwargs["VersionId"] = t.version
    if t.label:
        kwargs["VersionStage"] = t.label
    try:
        rsp = sm.get_secret_value(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        return map_error(exc, src.name, region, "GetSecretValue")
    if rsp.get("SecretString") is not None:
        data = rsp["SecretString"].encode()
    else:
        data = bytes(rsp.get("SecretBinary") or b"")
    return Fetched(data, str(rsp.get("VersionId", "")))


def ssm_key(name: str) -> str:
    """The parameter a name or ARN refers to ("arn:...:parameter/a/b" and "/a/b" are one)."""
    if name.startswith("arn:"):
        resource = name.split(":", 5)[-1].removeprefix("parameter")
        return resource if resource.count("/") > 1 else resource.removeprefix("/")
    return name


def ssm_batches(sources: Sequence[AwsSource], failover: bool) -> list[list[AwsSource]]:
    """Batches of at most SSM_BATCH sources, no parameter name twice in one batch.

    GetParameters answers with plain names (moto leaves out the Selector), so two versions of one
    parameter in a batch could not be told apart."""
    batches: list[list[AwsSource]] = []
    for s in sources:
        key = ssm_key(target_of(s, failover).name)
        for b in batches:
            if len(b) < SSM_BATCH and all(ssm_key(target_of(o, failover).name) != key for o in b):
                b.append(s)
                break
        else:
            batches.append([s])
    return batches


def _selector(t: Target) -> str:
    if t.version:
        return f"{t.name}:{t.version}"
    if t.label:
        return f"{t.name}:{t.label}"
    return t.name


def get_parameters(
    ssm: Any, batch: Sequence[AwsSource], region: str, failover: bool
) -> dict[AwsSource, Result]:
    requested = {_selector(target_of(s, failover)): s for s in batch}
    by_key = {ssm_key(target_of(s, failover).name): s for s in batch}
    try:
        rsp = ssm.get_parameters(Names=list(requested), WithDecryption=True)
    except (ClientError, BotoCoreError) as exc:
        errors = {
            s: map_error(exc, s.name, region, "GetParameters", noun="parameter") for s in batch
        }
        if len(batch) > 1 and any(e.code == "BadRequest" for e in errors.values()):
            # One malformed name fails the whole call; ask one by one so the others still arrive.
            out: dict[AwsSource, Result] = {}
            for s in batch:
                out.update(get_parameters(ssm, [s], region, failover))
            return out
        return dict(errors)
    results: dict[AwsSource, Result] = {}
    for p in rsp.get("Parameters", []):
        src = by_key.get(ssm_key(p.get("Name", ""))) or by_key.get(ssm_key(p.get("ARN", "")))
        if src is not None:
            results[src] = Fetched(str(p.get("Value", "")).encode(), str(p.get("Version", "")))
    for bad in rsp.get("InvalidParameters", []):
        src = requested.get(bad)
        if src is not None:
            t = target_of(src, failover)
            which = f" (version {t.version})" if t.version else ""
            which = f" (label {t.label})" if t.label and not t.version else which
            results[src] = FetchError(
                src.name,
                f"parameter{which} not found in region {region}",
                transient=False,
                code="NotFound",
            )
    for s in batch:
        if s not in results:
            results[s] = FetchError(
                s.name,
                f"parameter missing from the GetParameters answer in region {region}",
                transient=False,
                code="NotFound",
            )
    return results
