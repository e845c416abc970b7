"""Move ``champion`` by hand: promote a version, or roll back to the champion's parent, with
the reason recorded on the version.

validate → run: :func:`validate` reads the champion and the target version and refuses a
version that does not exist, is already the champion, is unfinished (``incomplete``), or whose
class set the catalog does not know; :func:`run_promote` moves the alias through the model's
promotion actor (a compare-and-set against the champion :func:`validate` read, so a job that
promoted meanwhile is not silently undone) and tags who, why and when. Serve follows the alias
within its poll interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from catalog import Catalog
from catalog.class_sets import ClassSetNotFound, load_class_set
from fewshot.backends import promotion, registry
from fewshot.workflows.options import Flat, StoreOptions


class PromoteError(ValueError):
    """A promotion that cannot be done; nothing was changed."""


@dataclass(frozen=True)
class PromoteOptions:
    """Make a registered version the 'champion' (Serve answers with it within its poll
    interval), or roll back to the current champion's parent, recording who did it and why."""

    version: int | None = None
    """The version to promote (give it, or --rollback)."""
    rollback: bool = False
    """Promote the current champion's parent_version instead of --version."""
    reason: str = ""
    """Why (required): recorded on the version as promotion_reason."""
    config_file: str | None = None
    """A YAML file of these options (flag names); flags given beside it win."""
    store: Annotated[StoreOptions, Flat] = field(default_factory=lambda: StoreOptions(experiment="fewshot-promote"))


@dataclass
class PromotePlan:
    opts: PromoteOptions
    champion: registry.VersionInfo | None
    target: registry.VersionInfo


def validate(opts: PromoteOptions) -> PromotePlan:
    store = opts.store
    try:
        store.check()
    except ValueError as err:
        raise PromoteError(str(err)) from None
    if not opts.reason.strip():
        raise PromoteError("--reason is required: say why the champion changes (it is recorded)")
    if opts.rollback == (opts.version is not None):
        raise PromoteError("give exactly one of --version N and --rollback")
    champion = registry.get_alias(store.mlflow_uri, store.model_name, registry.CHAMPION)
    if opts.rollback:
        if champion is None:
            raise PromoteError(f"{store.model_name!r} has no champion to roll back")
        if champion.parent_version is None:
            raise PromoteError(f"champion version {champion.version} is a base model: it has no parent to roll back to")
        number = champion.parent_version
    else:
        number = int(opts.version)
    try:
        target = registry.get_version(store.mlflow_uri, store.model_name, number)
    except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for "no such version"
        raise PromoteError(f"{store.model_name!r} has no version {number}: {err}") from None
    if champion is not None and champion.version == target.version:
        raise PromoteError(f"version {target.version} is already the champion")
    if target.tags.get(promotion.INCOMPLETE_TAG) == "true":
        raise PromoteError(f"version {target.version} is unfinished (tagged {promotion.INCOMPLETE_TAG!r}: "
                           "its job died before promotion); it is never served")
    try:
        load_class_set(Catalog(store.catalog), target.class_set)
    except ClassSetNotFound:
        raise PromoteError(f"version {target.version}'s class set {target.class_set!r} is not in the catalog "
                           f"at {store.catalog}: refusing to serve classes this catalog does not know") from None
    return PromotePlan(opts=opts, champion=champion, target=target)


def run_promote(opts: PromoteOptions) -> promotion.Decision:
    plan = validate(opts)
    store = plan.opts.store
    kind = "rollback" if opts.rollback else "manual"
    before = plan.champion.version if plan.champion is not None else None
    reason = f"{kind} by {promotion.who()} at {promotion.now()}: {opts.reason.strip()}"
    decision = promotion.promote(store.mlflow_uri, store.model_name, plan.target.version,
                                 expected_champion=before, want_champion=True, reason=reason,
                                 tags={"promoted_by": promotion.who(), "promoted_at": promotion.now(),
                                       "promotion_kind": kind})
    if not decision.promoted:
        raise PromoteError(decision.reason)
    return decision
