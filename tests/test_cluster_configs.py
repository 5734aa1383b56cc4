"""cluster/: the Ray autoscaler config, the KubeRay RayJob, the Dockerfile and the README commands.

No cloud, network or docker daemon: the AWS config goes through Ray's own config preparation and schema
validation (what `ray up` runs before it calls AWS), the RayJob is checked against the project it runs
(entrypoint, config, GPU layout), and the Dockerfile is read line by line.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.resource_and_label_spec import ResourceAndLabelSpec
from ray.autoscaler._private.util import prepare_config, validate_config

from dxray.config import Config, load_config
from dxray.distributed.layout import layout

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# (vCPUs, GPUs) of the GPU instance types the comments in aws.yaml talk about: the declared resources of
# the worker type must be the instance's real shape (Ray only auto-detects them with an EC2 API call).
GPU_INSTANCES = {
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
    "g6e.xlarge": (4, 1), "g6e.2xlarge": (8, 1), "g6e.12xlarge": (48, 4), "g6e.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _readme_image() -> str:
    """The tag the README builds: the one image every config must run."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", README.read_text())
    assert m, "README has no `docker build -f cluster/Dockerfile -t IMAGE .` command"
    return m.group(1)


def _readme_cluster_section() -> str:
    """README's "Run on a cluster" section, shell continuation lines joined."""
    text = README.read_text()
    assert text.index("## Run on a cluster") < text.index("## Reading the results")
    section = text[text.index("## Run on a cluster"):text.index("## Reading the results")]
    return re.sub(r" *\\\n\s*", " ", section)


def _gpu_worker_type(cfg: dict) -> tuple[str, dict]:
    workers = {name: t for name, t in cfg["available_node_types"].items()
               if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert len(workers) == 1, f"expected one GPU worker type, found {sorted(workers)}"
    return next(iter(workers.items()))


def _resolved_resources(monkeypatch, node_type: dict, start_command: str, is_head: bool) -> dict:
    """The resources a node advertises, resolved by Ray's own code from what the launcher gives `ray start`:
    the node type's resources in RAY_OVERRIDE_RESOURCES (see autoscaler NodeUpdater) and --num-cpus/--num-gpus."""
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps(node_type["resources"]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = shlex.split(start_command.split(";")[-1])
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    spec = ResourceAndLabelSpec(num_cpus=int(flags["num-cpus"]) if "num-cpus" in flags else None,
                                num_gpus=int(flags["num-gpus"]) if "num-gpus" in flags else None)
    return spec.resolve(is_head=is_head, node_ip_address="127.0.0.1").to_resource_dict()


def _job_command(argv: list[str]) -> tuple[Path, Config]:
    """`python jobs/audit.py CONFIG key=value...` → (script, the config dxray builds from it)."""
    assert argv[0] == "python", argv
    script, config = ROOT / argv[1], ROOT / argv[2]
    assert script.is_file(), f"entrypoint script {argv[1]} is not in the repository"
    assert config.is_file(), f"entrypoint config {argv[2]} is not in the repository"
    return script, load_config(config, argv[3:])


def _assert_gpus_fit(cfg: Config, nodes: int, gpus_per_node: int, cpus_per_node: float) -> None:
    """The job's explainers are exactly what dxray's own layout packs onto the fully scaled GPU nodes:
    fewer would leave nodes unused, more would wait forever for a GPU that never comes."""
    c = cfg.cluster
    assert c.explainers is not None, "an autoscaling cluster starts with 0 GPUs: set cluster.explainers"
    assert 0 < c.gpus_per_explainer <= gpus_per_node
    assert c.gpus_per_segmenter <= gpus_per_node
    unset = cfg.model_copy(update={"cluster": c.model_copy(update={"explainers": None})})
    fits, _ = layout(unset, nodes * gpus_per_node)
    assert c.explainers == fits, f"cluster.explainers={c.explainers} but {nodes} x {gpus_per_node} GPU(s) hold {fits}"
    per_node = math.ceil(c.explainers / nodes)
    assert per_node * c.cpus_per_explainer + c.segmenters * c.cpus_per_segmenter <= cpus_per_node


# ---- cluster/aws.yaml -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return _yaml(AWS)


@pytest.fixture(scope="module")
def aws_prepared(aws) -> dict:
    """The config as `ray up` hands it to the AWS provider: Ray's defaults merged in, then validated."""
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_ray_schema_and_a_broken_one_does_not(aws, aws_prepared):
    assert aws_prepared["provider"]["type"] == "aws"
    broken = copy.deepcopy(aws)
    _, worker = _gpu_worker_type(broken)
    worker["resources"]["GPU"] = 0.5  # Ray's schema wants whole numbers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    typo = copy.deepcopy(aws)
    typo["available_node_types"][typo["head_node_type"]]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))


def test_aws_head_takes_no_tasks(monkeypatch, aws_prepared):
    head = aws_prepared["available_node_types"][aws_prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0
    start = aws_prepared["head_start_ray_commands"][-1]
    assert "ray start --head" in start and "--num-cpus=0" in start
    advertised = _resolved_resources(monkeypatch, head, start, is_head=True)
    assert advertised.get("CPU", 0) == 0, advertised  # (GPUs would be detected here on a GPU machine, not on m5)


def test_aws_gpu_workers_scale_from_zero(monkeypatch, aws_prepared):
    name, worker = _gpu_worker_type(aws_prepared)
    assert worker["min_workers"] == 0
    assert 0 < worker["max_workers"] <= aws_prepared["max_workers"]
    instance = worker["node_config"]["InstanceType"]
    assert instance in GPU_INSTANCES, f"{instance}: add its (vCPU, GPU) shape to GPU_INSTANCES"
    assert (worker["resources"]["CPU"], worker["resources"]["GPU"]) == GPU_INSTANCES[instance]
    advertised = _resolved_resources(monkeypatch, worker, aws_prepared["worker_start_ray_commands"][-1],
                                     is_head=False)
    assert advertised["GPU"] == worker["resources"]["GPU"] and advertised["CPU"] == worker["resources"]["CPU"]
    assert aws_prepared["idle_timeout_minutes"] > 0
    assert aws_prepared["upscaling_speed"] > 0


def test_aws_runs_the_image_with_gpus_on_workers_only(aws_prepared):
    docker = aws_prepared["docker"]
    assert docker["image"] == _readme_image()
    assert docker["image"].endswith(f":{VERSION}")
    assert docker["container_name"]
    assert "--gpus all" in docker.get("worker_run_options", [])
    assert "--gpus all" not in docker.get("run_options", []) + docker.get("head_run_options", [])
    # Ray's AWS defaults pip-install a nightly Ray on every node unless the config says otherwise.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert not any("pip install" in cmd for cmd in aws_prepared[key]), key
    # S3 through instance roles, one for each node type.
    for t in aws_prepared["available_node_types"].values():
        assert t["node_config"]["IamInstanceProfile"]


def test_readme_job_fits_the_aws_gpu_workers(aws_prepared):
    m = re.search(r"ray job submit --address \S+ --working-dir \. -- (python [^\n]+)", _readme_cluster_section())
    assert m, "README has no `ray job submit --address ... --working-dir . -- python ...` command"
    script, cfg = _job_command(shlex.split(m.group(1)))
    assert script == ROOT / "jobs" / "audit.py"
    assert cfg.output.startswith("s3://")
    _, worker = _gpu_worker_type(aws_prepared)
    _assert_gpus_fit(cfg, worker["max_workers"], worker["resources"]["GPU"], worker["resources"]["CPU"])


# ---- cluster/kuberay/rayjob.yaml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml(RAYJOB)


def _gpu_group(rayjob: dict) -> dict:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                    for c in g["template"]["spec"]["containers"])]
    assert len(gpu) == 1, "expected one worker group with nvidia.com/gpu limits"
    return gpu[0]


def _containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_rayjob_shape(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    # rayStartParams are strings in the CRD; num-cpus "0" keeps tasks and actors off the head.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for c in _containers(rayjob):
        assert c["image"] == _readme_image()
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert all(p["spec"]["securityContext"]["runAsNonRoot"] is True for p in pods)


def test_rayjob_gpu_group_autoscales_from_zero(rayjob):
    group = _gpu_group(rayjob)
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert group["maxReplicas"] >= 1
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    # Kubernetes rejects a GPU request that differs from its limit.
    assert int(res.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus


def test_rayjob_entrypoint_is_the_projects_job(rayjob):
    spec = rayjob["spec"]
    script, cfg = _job_command(shlex.split(spec["entrypoint"]))
    assert script == ROOT / "jobs" / "audit.py"
    assert cfg.output.startswith("s3://")
    group = _gpu_group(rayjob)
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    _assert_gpus_fit(cfg, group["maxReplicas"], int(limits["nvidia.com/gpu"]), float(limits["cpu"]))
    # The entrypoint's relative paths resolve in the image's copy of the repository.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile()["workdir"]


# ---- cluster/Dockerfile, .dockerignore --------------------------------------------------------------


def _dockerfile() -> dict:
    """Instructions of the Dockerfile: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    instructions = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    out: dict = {"from": [], "user": [], "copy": [], "run": [], "env": [], "workdir": None}
    for op, arg in instructions:
        op = op.upper()
        if op == "WORKDIR":
            out["workdir"] = arg.strip()
        elif op.lower() in out:
            out[op.lower()].append(arg.strip())
    return out


def test_dockerfile_base_matches_ray_and_python():
    df = _dockerfile()
    assert len(df["from"]) == 1
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert df["from"][0] == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    assert any(f"ray.__version__ == '{ray.__version__}'" in r for r in df["run"])


def test_dockerfile_installs_the_project_with_constraints_as_non_root():
    df = _dockerfile()
    # The last USER is a non-zero numeric uid: Kubernetes' runAsNonRoot (rayjob.yaml) can only check numbers.
    uid = df["user"][-1].split(":")[0] if df["user"] else "0"
    assert uid.isdigit() and int(uid) != 0, df["user"]
    installs = [r for r in df["run"] if "pip install" in r]
    assert installs and all("-c constraints.txt" in r for r in installs)
    assert re.search(r"pip install (--no-deps )?-c constraints\.txt \.(\s|$)", installs[-1])
    copied = " ".join(df["copy"])
    for needed in ("pyproject.toml", "constraints.txt", "dxray", "jobs"):
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), needed
    first_copy = next(i for i, line in enumerate(DOCKERFILE.read_text().splitlines()) if "constraints.txt ./" in line)
    first_pip = next(i for i, line in enumerate(DOCKERFILE.read_text().splitlines()) if "pip install" in line)
    assert first_copy < first_pip
    assert not re.search(r"(?i)(secret|token|password|access_key)", " ".join(df["env"]))


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = {p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")}
    for excluded in (".venv", ".git", "dxray-out", "**/__pycache__"):
        assert excluded in patterns, excluded
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "dxray", "jobs"):
        assert needed not in patterns, needed


# ---- README and secrets -----------------------------------------------------------------------------


def test_readme_run_on_a_cluster_commands():
    section = _readme_cluster_section()
    image = _readme_image()
    assert image.endswith(f":{VERSION}")
    for command in (f"docker build -f cluster/Dockerfile -t {image} .", "ray up -y cluster/aws.yaml",
                    "ray job submit --address", "--working-dir . --", "python jobs/audit.py",
                    "ray down -y cluster/aws.yaml", "kubectl apply -f cluster/kuberay/rayjob.yaml"):
        assert command in section, command


@pytest.mark.parametrize("path", [AWS, RAYJOB, DOCKERFILE, DOCKERIGNORE], ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)  # AWS access key ids
    assert not re.search(r"(?i)aws_(secret_access_key|session_token|access_key_id)\s*[:=]", text)
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*\S", text)
