"""Glue: store and load the fine-tuning configuration a Ray Tune search found best.

``jobs/tune.py`` ends with :func:`save_best_config`: the winning trial's hyperparameters (the
:data:`TUNABLE_KEYS`), its validation figures and what it was tuned for (dataset, classes,
shots, freezing policy, read from the parent run's params) go into ``best_config.json``, an
artifact of the search's parent MLflow run, and the registered model gets the tag
``fewshot.best_config_run`` = that run's id. ``jobs/add_classes.py --config best`` then calls
:func:`load_config`, which follows the tag; ``--config PATH.json`` reads a file instead (either
such a record or a flat ``{"lr": ..., "steps": ...}`` mapping). The source string it returns
(``tune:<run_id>`` or ``file:<abs path>``) is what the registered version records.

:func:`apply_to` puts a loaded config into the
:class:`~fewshot.learning.method.MethodOptions` / :class:`~fewshot.learning.loop.TrainConfig` of a
run, so a run that applies the config trains the way the winning trial did.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from fewshot.balancers import balancer_names
from fewshot.learning.freezing import POLICIES
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodOptions

TUNABLE_KEYS = ("balancer", "balancer_momentum", "distill_beta", "lr", "steps")
# a config may also name the freezing policy it was trained with (a search can hold trials
# under different policies: add_classes' defaults under their policy, beside the sampled
# trials under the search's --freeze) and
# the parent distillation weight (searched only where add_classes applies it; records written
# before it was a key leave it out, and add_classes' default applies)
OPTIONAL_KEYS = ("freeze", "parent_distill")
CONFIG_KEYS = TUNABLE_KEYS + OPTIONAL_KEYS
BEST_CONFIG_TAG = "fewshot.best_config_run"
BEST_CONFIG_ARTIFACT = "best_config.json"
RECORD_FORMAT = 1
# parent-run params copied into the record: what the configuration was tuned for
CONTEXT_PARAMS = ("dataset", "classes", "shots", "seed", "freeze", "batch_size", "metric",
                  "tune_split", "parent_version", "val_images")


def _client(uri: str):
    from fewshot.backends.registry import client

    return client(uri)


# ---- validation ------------------------------------------------------------------------------

def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"config {key!r}: expected a number, got {value!r}")
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"config {key!r}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"config {key!r}: must be finite, got {value!r}")
    return out


def normalize_config(config: Mapping[str, Any], require_all: bool = False) -> dict:
    """Check and normalize a tuned config: only :data:`CONFIG_KEYS`, sane values (``require_all``:
    every one of :data:`TUNABLE_KEYS`; ``freeze`` stays optional).

    ``freeze``: one of the freezing policies; ``balancer``: ``None``/``"none"``/``fixed``/
    ``pgb``/``gradnorm``; ``balancer_momentum`` in [0, 1); ``distill_beta`` >= 0;
    ``parent_distill`` >= 0; ``lr`` > 0; ``steps`` a positive integer. Raises ``ValueError``
    naming the offending key."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a config must be a JSON object of {CONFIG_KEYS}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed: {list(CONFIG_KEYS)}")
    missing = [k for k in TUNABLE_KEYS if k not in config]
    if require_all and missing:
        raise ValueError(f"config lacks {missing}; a tuned config has all of {list(TUNABLE_KEYS)}")
    if not config:
        raise ValueError(f"empty config: give at least one of {list(TUNABLE_KEYS)}")
    out: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        if key not in config:
            continue
        value = config[key]
        if key == "balancer":
            if value is None or (isinstance(value, str) and value.lower() == "none"):
                out[key] = None
            elif isinstance(value, str) and value in balancer_names():
                out[key] = value
            else:
                raise ValueError(f"config 'balancer': {value!r} is not one of None, {list(balancer_names())}")
        elif key == "balancer_momentum":
            v = _number(key, value)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"config 'balancer_momentum': must be in [0, 1), got {value!r}")
            out[key] = v
        elif key in ("distill_beta", "parent_distill"):
            v = _number(key, value)
            if v < 0:
                raise ValueError(f"config {key!r}: must be >= 0, got {value!r}")
            out[key] = v
        elif key == "lr":
            v = _number(key, value)
            if v <= 0:
                raise ValueError(f"config 'lr': must be > 0, got {value!r}")
            out[key] = v
        elif key == "freeze":
            if value not in POLICIES:
                raise ValueError(f"config 'freeze': {value!r} is not one of {list(POLICIES)}")
            out[key] = value
        elif key == "steps":
            v = _number(key, value)
            if v != int(v) or v < 1:
                raise ValueError(f"config 'steps': must be a positive integer, got {value!r}")
            out[key] = int(v)
    return out


# ---- store -----------------------------------------------------------------------------------

def _context_from_run(client, run_id: str) -> dict:
    params = client.get_run(run_id).data.params
    out: dict[str, Any] = {}
    for key in CONTEXT_PARAMS:
        if key not in params:
            continue
        raw = params[key]
        try:
            out[key] = json.loads(raw)
        except (TypeError, ValueError):
            out[key] = raw
    return out


def save_best_config(uri: str, model_name: str, config: dict, run_id: str, metrics: dict) -> None:
    """Log ``best_config.json`` (config, metrics, what it was tuned for) to run ``run_id`` and
    tag registered model ``model_name`` with ``fewshot.best_config_run`` = ``run_id``.

    ``config`` may hold more keys than :data:`CONFIG_KEYS` (they are dropped); it must hold all
    of :data:`TUNABLE_KEYS`, and ``freeze`` when the trial it came from named one. The
    classes/shots/dataset/freeze the search ran with are read from the run's
    params (``jobs/tune.py`` logs them)."""
    from mlflow.exceptions import MlflowException

    tuned = normalize_config({k: v for k, v in config.items()
                              if k in TUNABLE_KEYS or (k in OPTIONAL_KEYS and v is not None)}, require_all=True)
    client = _client(uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException as err:
        raise ValueError(f"registered model {model_name!r} not found at {uri}: {err.message}") from None
    record = {
        "format": RECORD_FORMAT,
        "config": tuned,
        "metrics": {k: float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "tuned_for": _context_from_run(client, run_id),
        "run_id": run_id,
        "model_name": model_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    client.log_dict(run_id, record, BEST_CONFIG_ARTIFACT)
    client.set_registered_model_tag(model_name, BEST_CONFIG_TAG, run_id)


# ---- load ------------------------------------------------------------------------------------

def _config_of(data: Any, where: str) -> dict:
    """The tunable part of a record (``{"config": {...}, ...}``) or of a flat mapping."""
    if isinstance(data, Mapping) and "config" in data and isinstance(data["config"], Mapping):
        data = data["config"]
    try:
        return normalize_config(data)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None


def load_best_record(uri: str, model_name: str) -> dict:
    """The whole ``best_config.json`` record behind the model's ``fewshot.best_config_run`` tag."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        tags = client.get_registered_model(model_name).tags or {}
    except MlflowException:
        raise ValueError(f"no tuned config: registered model {model_name!r} not found at {uri}") from None
    run_id = tags.get(BEST_CONFIG_TAG)
    if not run_id:
        raise ValueError(f"no tuned config stored for {model_name!r} (no {BEST_CONFIG_TAG!r} tag): "
                         "run jobs/tune.py first, or pass a JSON file")
    with tempfile.TemporaryDirectory(prefix="fewshot-cfg-") as tmp:
        try:
            local = client.download_artifacts(run_id, BEST_CONFIG_ARTIFACT, tmp)
        except (MlflowException, OSError) as err:
            raise ValueError(f"run {run_id} (tagged on {model_name!r}) holds no readable "
                             f"{BEST_CONFIG_ARTIFACT}: {err}") from None
        record = _read_json(Path(local), f"{BEST_CONFIG_ARTIFACT} of run {run_id}")
    if not isinstance(record, dict):
        raise ValueError(f"{BEST_CONFIG_ARTIFACT} of run {run_id} is not a JSON object")
    record.setdefault("run_id", run_id)
    return record


def load_config(spec: str, uri: str, model_name: str) -> tuple[dict, str]:
    """``spec`` ``"best"``: the config :func:`save_best_config` stored for ``model_name``;
    otherwise a path to a JSON file (a stored record, or a flat mapping of some of
    :data:`TUNABLE_KEYS`). Returns (config with only CONFIG_KEYS, source) where source is
    ``"tune:<run_id>"`` or ``"file:<abs path>"``. Raises ``ValueError`` when nothing is
    stored, the file is missing, or a key/value is bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("config spec must be 'best' or a path to a .json file")
    spec = spec.strip()
    if spec == "best":
        record = load_best_record(uri, model_name)
        run_id = record["run_id"]
        config = _config_of(record, f"{BEST_CONFIG_ARTIFACT} of run {run_id}")
        missing = [k for k in TUNABLE_KEYS if k not in config]
        if missing:
            raise ValueError(f"{BEST_CONFIG_ARTIFACT} of run {run_id} lacks {missing}")
        return config, f"tune:{run_id}"
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"config file {path} not found (pass 'best' or a path to a .json file)")
    return _config_of(_read_json(path, f"config file {path}"), f"config file {path}"), f"file:{path}"


# ---- apply ----------------------------------------------------------------------------------

def apply_to(config: Mapping[str, Any], method: MethodOptions, train: TrainConfig) -> tuple[MethodOptions, TrainConfig]:
    """``method`` and ``train`` with a tuned config's values (balancer, its momentum, beta, lr,
    steps, and the freezing policy and parent distillation weight when it names them) in place
    of theirs: how add_classes, a Tune trial and the comparison all train the way the winning
    trial did."""
    cfg = normalize_config(config)
    method = replace(method, **{k: cfg[k] for k in ("balancer", "balancer_momentum", "distill_beta", "freeze",
                                                    "parent_distill") if k in cfg})
    train = replace(train, **{k: cfg[k] for k in ("lr", "steps") if k in cfg})
    return method, train
