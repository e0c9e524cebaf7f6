"""The deployment files, checked by the tools that will read them: Docker Compose's own parser, the
Kubernetes API schemas (kubernetes-validate), systemd's verifier, docker-py's build-context filter, and
augpipe's and Ray's own command-line parsers for every command they schedule.

No Docker daemon or Kubernetes cluster exists where these tests run: nothing here builds an image or
starts a container. Missing tools skip locally and fail under CI (.ci/run installs them).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from augpipe.pipeline.cli import main as augpipe_cli
from augpipe.pipeline.config import load_recipe
from tests.checkout import LOCAL_ONLY, REPO, SOURCES, copy_checkout

DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
IMAGE_FILES = ["Dockerfile", "deploy/fetch_models.py", "configs/profiles/gpu.yaml"]


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: .ci/run installs it (apt-get install -y {package})")
        pytest.skip(f"{name} not installed (apt-get install -y {package})")
    return path


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as Docker Compose resolves it, every profile included."""
    binary = tool("docker-compose", "docker-compose")
    proc = subprocess.run(
        [binary, "-f", "docker-compose.yml", "--profile", "job", "--profile", "setup", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("AUGPIPE_")},
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["services"]


def kube_documents() -> list[tuple[str, dict]]:
    return [
        (path.name, document)
        for path in sorted(KUBE.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    ]


def kube(kind: str) -> dict:
    (document,) = [document for _, document in kube_documents() if document["kind"] == kind]
    return document


def test_compose_runs_a_head_gpu_workers_and_jobs_that_join_the_head(compose):
    assert set(compose) == {"ray-head", "ray-worker", "augpipe-job", "fetch-models"}
    head, worker, job = compose["ray-head"], compose["ray-worker"], compose["augpipe-job"]
    assert head["ports"] in (["127.0.0.1:8265:8265/tcp"], [{"host_ip": "127.0.0.1", "target": 8265}])
    assert "--dashboard-port=8265" in head["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "--address=ray-head:6379" in worker["command"]
    for service in (head, worker):
        assert service["restart"] == "unless-stopped"
        assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD"
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert job["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert job["profiles"] == ["job"] and job["restart"] == "no"
    assert job["command"][:4] == ["ray", "job", "submit", "--address=http://ray-head:8265"]


def test_compose_mounts_the_same_data_path_and_model_cache_everywhere_the_run_goes(compose):
    for name in ("ray-head", "ray-worker", "fetch-models"):
        volumes = {volume.split(":")[1] for volume in compose[name]["volumes"]}
        assert {"/data", "/models"} <= volumes, name
    assert compose["fetch-models"]["profiles"] == ["setup"]
    assert compose["fetch-models"]["command"] == ["python", "deploy/fetch_models.py", "--profile", "gpu"]
    assert compose["fetch-models"]["environment"]["HF_HUB_OFFLINE"] == "0"


def test_compose_job_takes_its_recipe_and_paths_from_the_environment():
    binary = tool("docker-compose", "docker-compose")
    env = {**os.environ, "AUGPIPE_RECIPE": "cmda", "AUGPIPE_OUTPUT": "/data/out/cmda"}
    proc = subprocess.run(
        [binary, "-f", "docker-compose.yml", "--profile", "job", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    command = yaml.safe_load(proc.stdout)["services"]["augpipe-job"]["command"]
    assert command[command.index("run") + 1] == "cmda"
    assert command[command.index("--output") + 1] == "/data/out/cmda"


def test_the_image_build_context_holds_sources_only(tmp_path):
    from docker.utils.build import exclude_paths

    checkout = copy_checkout(tmp_path / "checkout")
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    context = exclude_paths(str(checkout), [p for p in patterns if p and not p.startswith("#")])
    assert [path for path in SOURCES + IMAGE_FILES if path not in context] == []
    assert [path for path in LOCAL_ONLY if path in context] == []


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for name, document in kube_documents():
        if document["kind"] == "RayJob":  # a KubeRay CRD: its pod templates are checked as core objects
            cluster = document["spec"]["rayClusterSpec"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
                kubernetes_validate.validate({**wrapped, "template": group["template"]}, version, strict=True)
        else:
            kubernetes_validate.validate(document, version, strict=True)
        assert document["kind"] in {
            "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "Job", "PersistentVolumeClaim",
        }, name  # fmt: skip


def test_the_rayjob_runs_augpipe_on_gpu_workers_and_cleans_up():
    spec = kube("RayJob")["spec"]
    assert kube("RayJob")["apiVersion"] == "ray.io/v1"
    assert kube("RayJob")["metadata"]["generateName"], "a new name each night (kubectl create)"
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600, "a run ends before the next night's starts"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (workers,) = cluster["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert (
        head["image"] == worker["image"] == kube("Job")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    claims = {
        doc["metadata"]["name"] for _, doc in kube_documents() if doc["kind"] == "PersistentVolumeClaim"
    }
    for group in (cluster["headGroupSpec"], workers):
        volumes = group["template"]["spec"]["volumes"]
        used = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
        assert used == claims
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert {"/data", "/models", "/dev/shm"} <= mounts


def test_the_cronjob_creates_the_rayjob_every_night():
    cron = kube("CronJob")["spec"]
    assert cron["schedule"] == "0 2 * * *" and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = next(m for m in container["volumeMounts"] if container["command"][3].startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    documented = re.search(
        r"kubectl create configmap (\S+) --from-file=(\S+)=", (KUBE / "cronjob.yaml").read_text()
    )
    assert volume["configMap"]["name"] == documented[1]
    assert container["command"][3] == f"{mount['mountPath']}/{documented[2]}"
    (rule,) = kube("Role")["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}
    assert pod["serviceAccountName"] == kube("RoleBinding")["subjects"][0]["name"]


def test_systemd_units_verify():
    analyze = tool("systemd-analyze", "systemd")
    units = [str(DEPLOY / "systemd" / name) for name in ("augpipe-nightly.service", "augpipe-nightly.timer")]
    proc = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    # The one complaint allowed: the documented install path does not exist on this test machine.
    absent = "Command /opt/augpipe/.venv/bin/ray is not executable: No such file or directory"
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if absent not in line]
    assert complaints == []
    timer = (DEPLOY / "systemd" / "augpipe-nightly.timer").read_text()
    calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M)[1]
    proc = subprocess.run([analyze, "calendar", calendar], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Normalized form: *-*-* 02:00:00" in proc.stdout


def cron_entries() -> list[list[str]]:
    lines = (DEPLOY / "cron" / "augpipe-nightly").read_text().splitlines()
    return [line.split(maxsplit=6) for line in lines if line.strip() and not re.match(r"#|\w+=", line)]


def test_the_cron_line_runs_nightly_as_the_augpipe_user():
    ((minute, hour, day, month, weekday, user, _),) = cron_entries()
    assert (minute, hour, day, month, weekday, user) == ("0", "2", "*", "*", "*", "augpipe")


def scheduled_command(source: str, request: pytest.FixtureRequest) -> list[str]:
    """The command a deployment file runs: ``ray job submit ... -- augpipe run ...``, or the latter alone."""
    if source == "compose":
        return request.getfixturevalue("compose")["augpipe-job"]["command"]
    if source == "rayjob":
        return shlex.split(kube("RayJob")["spec"]["entrypoint"])
    if source == "cron":
        (*_, cron_command) = cron_entries()[0]
        return shlex.split(cron_command.split("&&", 1)[1].split(">>")[0])
    systemd = (DEPLOY / "systemd" / "augpipe-nightly.service").read_text()
    defaults = dict(
        pair.split("=", 1) for pair in re.search(r"^Environment=(RECIPE=.+)$", systemd, re.M)[1].split()
    )
    exec_start = re.search(r"^ExecStart=(.+)$", systemd, re.M)[1]
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], exec_start))


@pytest.mark.parametrize("source", ["systemd", "cron", "compose", "rayjob"])
def test_every_scheduled_command_is_a_valid_nightly_augpipe_run(source, request):
    command = scheduled_command(source, request)
    if source != "rayjob":
        from ray.dashboard.modules.job.cli import submit

        assert Path(command[0]).name == "ray" and command[1:3] == ["job", "submit"]
        ray_options = submit.make_context("submit", command[3:]).params
        assert re.fullmatch(r"http://[\w.-]+:8265", ray_options["address"])
        command = list(ray_options["entrypoint"])
    assert command[:2] == ["augpipe", "run"]
    options = augpipe_cli.commands["run"].make_context("run", command[2:]).params
    assert options["profile"] == "gpu" and options["incremental"] is True
    assert options["address"] == "auto", "join the job's cluster; never start a CPU-only local Ray"
    assert Path(options["input_path"]).is_absolute() and Path(options["out_dir"]).is_absolute()
    load_recipe(options["recipe"], profile=options["profile"])


def test_fetch_models_lists_what_the_gpu_profile_needs():
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "fetch_models.py"), "--profile", "gpu", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": "/models"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split("\t")) for line in proc.stdout.splitlines()}
    assert rows == {
        ("hub", "Salesforce/blip-image-captioning-large"),
        ("hub", "openai/clip-vit-base-patch32"),
        ("hub", "stabilityai/sd-turbo"),
        ("whisper", "small.en", "/models/whisper"),
    }
