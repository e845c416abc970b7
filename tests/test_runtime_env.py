"""infra/runtime_env.yaml ships the code: a job submitted to a real Ray cluster whose nodes
have no path to this checkout imports fewshot/catalog/serving from Ray's runtime resources."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from services import BIN, ROOT, ray_env, ray_head

RUNTIME_ENV = ROOT / "infra" / "runtime_env.yaml"

PROBE = """
import hashlib, platform, sys, ray
import fewshot, catalog, serving, catalog.storage
print("PLATFORM", platform.system())
print("DRIVER", fewshot.__file__, catalog.__file__, serving.__file__)
ray.init()

@ray.remote(num_cpus=1)
def where():
    import platform, fewshot, catalog, serving
    return fewshot.__file__, catalog.__file__, serving.__file__, platform.system()

print("WORKER", *ray.get(where.remote()))
"""


def test_requirements_file_is_current_and_ray_accepts_the_runtime_env():
    from ray.runtime_env import RuntimeEnv

    r = subprocess.run([sys.executable, str(ROOT / "infra" / "requirements.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    assert spec["working_dir"] == "." and spec["py_modules"] == ["platform/fewshot"]
    assert "/platform/" in spec["excludes"]  # never shipped as a package-to-be
    cwd = os.getcwd()
    os.chdir(ROOT)  # the client reads the paths relative to where it runs
    try:
        env = RuntimeEnv(**spec)
    finally:
        os.chdir(cwd)
    packages = env["pip"]["packages"]
    lines = (ROOT / "infra" / "requirements-runtime.txt").read_text().split()
    assert packages == lines and all("==" in p for p in packages)
    assert not [p for p in packages if p.split("==")[0].split("[")[0].lower() == "ray"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    for p in packages:
        name, version = p.split("==")
        assert pins[name.split("[")[0]] == version


@pytest.mark.integration
def test_a_submitted_job_imports_the_shipped_code(tmp_path):
    env = ray_env(pythonpath=False)  # the cluster has no path to this checkout
    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    # A venv-based Ray clones the whole venv (gigabytes here) for a pip env; on the Ray
    # image the requirements are satisfied in place. This test checks the code shipping;
    # the pip list is checked above.
    spec.pop("pip")
    with ray_head(tmp_path / "ray", num_cpus=1, dashboard=True, env=env) as head:
        entrypoint = ("python jobs/add_classes.py --help > /dev/null && python -c "
                      + shlex.quote(PROBE))
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url,
             "--runtime-env-json", json.dumps(spec), "--", "bash", "-c", entrypoint],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in out, out[-4000:]
        lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()
                 if line.split()[:1] in (["PLATFORM"], ["DRIVER"], ["WORKER"])}
        assert lines["PLATFORM"] == ["Linux"]  # Python's own platform module, not shadowed
        resources = str(head.temp_dir)
        for where in (lines["DRIVER"], lines["WORKER"][:3]):
            fewshot_file, catalog_file, serving_file = where
            for f in where:
                assert f.startswith(resources) and "runtime_resources" in f, where
                assert not f.startswith(str(ROOT)) and "/work/main/" not in f
            assert fewshot_file.endswith("/fewshot/__init__.py")
            assert "py_modules_files" in fewshot_file and "working_dir_files" in catalog_file
        assert lines["WORKER"][3] == "Linux"
