"""The jobs' typed command lines: every option group turns into flags once, --help explains
them, a YAML --config-file supplies defaults the flags override, and bad input is refused."""
import subprocess
import sys

import pytest

from fewshot.workflows.add_classes import AddClassesOptions
from fewshot.workflows.base_train import BaseTrainOptions
from fewshot.workflows.cli import ConfigFileError, parse, read_config_file
from services import ROOT

JOBS = ["add_classes", "base_train", "tune", "promote", "ablation", "import_dataset", "build_dataset",
        "pretrain_teacher"]


@pytest.mark.parametrize("job", JOBS)
def test_every_job_explains_its_flags(job):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_shared_groups_become_the_same_flags():
    opts = parse(AddClassesOptions, ["--classes", "gear, star4", "--num-workers", "3", "--balancer", "pgb",
                                     "--freeze", "backbone", "--lr", "0.002", "--no-replay",
                                     "--mlflow-uri", "http://x", "--model-name", "m"])
    assert opts.classes == ("gear", "star4") and opts.cluster.num_workers == 3
    assert opts.method.balancer == "pgb" and opts.method.freeze == "backbone"
    assert opts.train.lr == 0.002 and opts.replay is False and opts.store.model_name == "m"
    base = parse(BaseTrainOptions, ["--num-workers", "3", "--lr", "0.002"])
    assert base.cluster.num_workers == 3 and base.train.lr == 0.002
    # per-job defaults of the same groups
    assert AddClassesOptions().train.steps == 150 and BaseTrainOptions().train.steps == 700
    assert AddClassesOptions().cluster.num_workers == 1 and BaseTrainOptions().cluster.num_workers == 2


def test_config_file_gives_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("classes: gear,star4\nshots: 10\nnum-workers: 2\ntrain:\n  lr: 0.003\n  steps: 40\n"
                   "method: {freeze: backbone, balancer: gradnorm}\n")
    opts = parse(AddClassesOptions, ["--config-file", str(cfg), "--shots", "3"])
    assert opts.classes == ("gear", "star4") and opts.shots == 3  # the flag wins
    assert opts.cluster.num_workers == 2 and opts.train.lr == 0.003 and opts.train.steps == 40
    assert opts.method.balancer == "gradnorm" and opts.method.freeze == "backbone"


def test_bias_correction_is_on_by_default_and_none_turns_it_off(tmp_path):
    assert parse(AddClassesOptions, ["--classes", "gear"]).bias_correction == 0.01
    assert parse(AddClassesOptions, ["--classes", "gear", "--bias-correction", "0.02"]).bias_correction == 0.02
    assert parse(AddClassesOptions, ["--classes", "gear", "--bias-correction", "None"]).bias_correction is None
    cfg = tmp_path / "off.yaml"
    cfg.write_text("classes: gear\nbias-correction: null\n")
    assert parse(AddClassesOptions, ["--config-file", str(cfg)]).bias_correction is None


@pytest.mark.parametrize("text, message", [
    ("shotz: 3\n", "unknown option"), ("train: {lrr: 1}\n", "unknown option"), ("- 1\n", "expected a mapping"),
    ("shots: [\n", "not valid YAML"), ("train: 3\n", "is a group of options"),
])
def test_bad_config_file_is_a_clear_error(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        read_config_file(AddClassesOptions, cfg)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "add_classes.py"), "--config-file", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_bad_flag_value_exits_2():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "add_classes.py"), "--balancer", "adam"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "adam" in proc.stderr
