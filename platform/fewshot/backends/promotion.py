"""Moving ``champion``: a compare-and-set, serialised per registered model, done last.

MLflow has no atomic compare-and-set on aliases, so every move goes through one detached,
named Ray actor per registered model (``fewshot-promotion:<model>`` in namespace
``fewshot``). The actor runs one call at a time, so "read ``champion``, compare it with the
version the job started from, move the alias, tag the decision" never interleaves with
another job's. Because the actor, not the job, makes the registry calls, a job killed while
it waits for the answer leaves the promotion either done completely or not started.

A version is registered with the tag ``incomplete=true`` (see :data:`INCOMPLETE_TAG`); the
actor removes it once the version has its alias and its ``promotion`` tag. A version that
keeps ``incomplete`` belongs to a job that died between registration and promotion: no
alias names it and Serve never loads it.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import os
from dataclasses import dataclass

import ray

from fewshot.backends import registry
from fewshot.backends.cluster import ensure_ray

NAMESPACE = "fewshot"
INCOMPLETE_TAG = "incomplete"


@dataclass(frozen=True)
class Decision:
    """What :func:`promote` did: the alias the version got and why."""

    version: int
    alias: str                 # "champion" or "candidate"
    reason: str
    champion_before: int | None

    @property
    def promoted(self) -> bool:
        return self.alias == registry.CHAMPION


def who() -> str:
    """The user a promotion is recorded for ($FEWSHOT_USER, else the login name)."""
    try:
        return os.environ.get("FEWSHOT_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class PromotionGate:
    """One per registered model; its methods run one at a time (a plain Ray actor)."""

    def compare_and_set(self, uri: str, model: str, version: int, expected_champion: int | None,
                        want_champion: bool, reason: str, tags: dict[str, str]) -> Decision:
        """``version`` becomes ``champion`` when ``want_champion`` and ``champion`` still
        names ``expected_champion`` (None: "no champion yet" or "do not check"); otherwise it
        becomes ``candidate`` and ``promotion_reason`` says why."""
        current = registry.get_alias(uri, model, registry.CHAMPION)
        before = current.version if current is not None else None
        alias = registry.CANDIDATE
        if want_champion:
            if expected_champion is None or before == expected_champion:
                alias = registry.CHAMPION
            else:
                reason = (f"champion moved to v{before} while this job ran (it started from "
                          f"v{expected_champion}); not promoted, so v{before}'s classes stay served")
        registry.tag_version(uri, model, version, {
            **tags, "promotion": alias, "promotion_reason": reason,
            "promotion_champion_before": "none" if before is None else str(before)})
        registry.set_alias(uri, model, alias, version)
        registry.delete_tag(uri, model, version, INCOMPLETE_TAG)
        return Decision(version=version, alias=alias, reason=reason, champion_before=before)


def gate_actor(model: str):
    """The model's promotion actor (created on first use, detached so it outlives jobs)."""
    ensure_ray()
    return PromotionGate.options(name=f"fewshot-promotion:{model}", namespace=NAMESPACE,
                                 lifetime="detached", get_if_exists=True).remote()


def promote(uri: str, model: str, version: int, *, expected_champion: int | None,
            want_champion: bool, reason: str, tags: dict[str, str] | None = None) -> Decision:
    """Move an alias onto ``version`` through the model's actor (see the module docstring)."""
    actor = gate_actor(model)
    return ray.get(actor.compare_and_set.remote(registry.tracking_uri(uri), model, int(version),
                                                expected_champion, bool(want_champion), reason,
                                                dict(tags or {})))
