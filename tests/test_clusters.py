"""clusters/ stays honest: the KubeRay manifests and the cluster-launcher YAML parse, pin the Ray we
test with, run entry points and flags that exist with configs that load, and request the GPUs those
configs expect. Nothing here starts Ray or talks to Kubernetes or AWS."""

from __future__ import annotations

import inspect
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

from selfe.config import Config, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
MANIFESTS = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob-")]
AWS = CLUSTERS / "aws" / "cluster.yaml"
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
AUTH_SECRET = "selfe-ray-auth"
# ray.io/v1 field names (KubeRay 1.6 CRDs) that the manifests may use; a typo is silently ignored by
# some API servers, so it must fail here.
RAYJOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "submissionMode", "shutdownAfterJobFinishes",
                 "ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds", "submitterPodTemplate",
                 "submitterConfig", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
                 "clusterSelector", "suspend", "deletionStrategy", "managedBy", "metadata"}
RAYSERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService", "excludeHeadPodFromServeSvc",
                     "rayClusterDeletionDelaySeconds", "deploymentUnhealthySecondThreshold",
                     "serviceUnhealthySecondThreshold", "managedBy"}
CLUSTER_FIELDS = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "authOptions", "headGroupSpec",
                  "workerGroupSpecs", "headServiceAnnotations", "gcsFaultToleranceOptions", "suspend", "managedBy",
                  "upgradeStrategy"}
HEAD_FIELDS = {"template", "rayStartParams", "serviceType", "headService", "enableIngress"}
WORKER_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                 "idleTimeoutSeconds", "scaleStrategy", "numOfHosts", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("160Gi", "64", "500m") as a number of bytes or cores."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match[2] in ("", *_UNITS), f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * _UNITS.get(match[2], 1)


def manifest(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"]}.get(
        doc["kind"], lambda s: s)(doc["spec"])


def groups(spec: dict) -> list[tuple[str, dict]]:
    """("head", headGroupSpec), then (groupName, workerGroupSpec) for every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def gpus(group: dict) -> int:
    resources = ray_container(group).get("resources", {})
    return int(quantity(resources.get("limits", {}).get("nvidia.com/gpu", 0)))


def worker_totals(doc: dict) -> tuple[int, float]:
    """(GPUs, CPUs) of all worker pods of a fixed-size RayJob cluster."""
    workers = cluster_spec(doc)["workerGroupSpecs"]
    total_gpus = sum(g["replicas"] * gpus(g) for g in workers)
    total_cpus = sum(g["replicas"] * quantity(ray_container(g)["resources"]["limits"]["cpu"]) for g in workers)
    return total_gpus, total_cpus


def job(name: str) -> dict:
    return manifest(CLUSTERS / "kuberay" / f"rayjob-{name}.yaml")


def entrypoint(doc: dict) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def runtime_env(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def run_script(script: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run an entry point in-process as `python script args...` from the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def check_script_and_flags(script: str, args: list[str], capsys, monkeypatch) -> str:
    """The script exists and its --help lists every plain flag in ``args``; returns the help text.
    ``--section.field=value`` overrides are left to the config loader (``--print-config``)."""
    assert (REPO / script).is_file(), f"no such script: {script}"
    code, help_text, _ = run_script(script, ["--help"], capsys, monkeypatch)
    assert code == 0
    for i, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if not arg.startswith("--") or "." in flag:
            continue
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{script} has no flag {flag}"
        if flag in ("--config", "--space"):
            assert (REPO / args[i + 1]).is_file(), f"{flag} {args[i + 1]} does not exist"
    return help_text


def resolved_config(script: str, args: list[str], capsys, monkeypatch, tmp_path: Path) -> Config:
    """The config the entry point would run with: its own --print-config, loaded back."""
    code, out, err = run_script(script, [*args, "--print-config"], capsys, monkeypatch)
    assert code == 0, f"{script} {' '.join(args)} rejects its config: {err}"
    path = tmp_path / f"{Path(script).stem}.resolved.toml"
    path.write_text(out)
    return load_config(path)


def pyproject_dependency(name: str) -> SpecifierSet:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{name}(\[|[<>=]|$)", d))
    return SpecifierSet(re.sub(r"^[\w-]+(\[[^\]]*\])?", "", spec))


def selfe_image() -> str:
    """The tag every KubeRay pod runs: the Dockerfile's image, named after this package's version and
    the Ray and Python it is built on."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"registry.example.com/selfe:{version}-ray{ray.__version__}-py311-gpu"


def pinned(packages: list[str], name: str) -> str:
    pins = [m[1] for p in packages if (m := re.search(rf"\b{name}==([\w.+]+)", p))]
    assert len(pins) == 1, f"expected one {name}==X pin in {packages}"
    return pins[0]


# ---------------------------------------------------------------- every manifest


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_schema_version_and_image(path):
    doc = manifest(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster", "RayService")
    if doc["kind"] == "RayJob":
        assert set(doc["spec"]) <= RAYJOB_FIELDS, set(doc["spec"]) - RAYJOB_FIELDS
    if doc["kind"] == "RayService":
        assert set(doc["spec"]) <= RAYSERVICE_FIELDS, set(doc["spec"]) - RAYSERVICE_FIELDS
    spec = cluster_spec(doc)
    assert set(spec) <= CLUSTER_FIELDS, set(spec) - CLUSTER_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_FIELDS, set(group) - WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["rayVersion"] == ray.__version__
    for _, group in groups(spec):
        assert ray_container(group)["image"] == selfe_image()
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams values are strings"


def test_ray_pin_and_python_tag_agree_with_pyproject():
    assert ray.__version__ in pyproject_dependency("ray")
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.11" in requires  # the -py311 images
    assert yaml.safe_load(AWS.read_text())["docker"]["image"] == IMAGE


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_have_shm_env_and_token_auth(path):
    spec = cluster_spec(manifest(path))
    assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    for name, group in groups(spec):
        pod, container = group["template"]["spec"], ray_container(group)
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert len(shm) == 1, f"{path.name} {name}: one memory-backed emptyDir for /dev/shm"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/dev/shm") == shm[0]["name"], f"{path.name} {name}: /dev/shm not mounted"
        shm_bytes = quantity(shm[0]["emptyDir"]["sizeLimit"])
        limits = container["resources"]["limits"]
        # tmpfs pages count against the container's memory limit, and the object store lives in them
        assert shm_bytes < quantity(limits["memory"])
        assert int(group["rayStartParams"]["object-store-memory"]) < shm_bytes
        assert container["resources"]["requests"]["cpu"] == limits["cpu"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "selfe-s3"
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server runs basic auth
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "selfe-mlflow"
        assert mounts.get(env["SELFE_MODEL_CACHE"]["value"]) == "model-cache"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_head_has_no_gpus_and_runs_no_tasks(path):
    spec = cluster_spec(manifest(path))
    head = spec["headGroupSpec"]
    resources = ray_container(head)["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {}) and "nvidia.com/gpu" not in resources.get("requests", {})
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(gpus(g) > 0 for g in spec["workerGroupSpecs"]), "every worker group has GPUs"


# ---------------------------------------------------------------- serving


SERVE_CONFIGS = {"clusters/serve.yaml": lambda: yaml.safe_load((CLUSTERS / "serve.yaml").read_text()),
                 "kuberay/rayservice.yaml": lambda: yaml.safe_load(
                     manifest(CLUSTERS / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_configs_validate_and_build_the_selfe_app(name):
    """Serve's own schema accepts the config; its app's args are serving settings that build the app (the
    step `serve run` / KubeRay take before any replica starts); the deployment it configures exists."""
    from ray.serve.schema import ServeDeploySchema

    from selfe.configtools import ConfigError
    from selfe.serve.app import DEPLOYMENT, build_app, make_deployment
    from selfe.serve.settings import ServeSettings

    config = SERVE_CONFIGS[name]()
    ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]
    assert app["import_path"] == "selfe.serve.app:build_app" and app["route_prefix"] == "/"
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT]
    settings = ServeSettings.from_dict(app["args"])
    assert make_deployment(settings).bind(settings.as_dict()) is not None
    # Serve calls an application builder with exactly one argument, the args dict (else a TypeError at deploy)
    assert list(inspect.signature(build_app).parameters) == ["args"]
    with pytest.raises(ConfigError, match="unknown serve setting"):
        ServeSettings.from_dict({**app["args"], "max_batch": 8})


def test_rayservice_replicas_fit_the_gpu_workers():
    doc = manifest(CLUSTERS / "kuberay" / "rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    (deployment,) = app["deployments"]
    per_replica = deployment["ray_actor_options"]
    (workers,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    node_gpus, node_cpus = gpus(workers), quantity(ray_container(workers)["resources"]["limits"]["cpu"])
    assert per_replica["num_gpus"] == 1 and app["args"]["device"] == "cuda"
    assert deployment["autoscaling_config"]["max_replicas"] <= workers["maxReplicas"] * node_gpus
    assert per_replica["num_cpus"] * node_gpus <= node_cpus
    assert deployment["max_ongoing_requests"] == app["args"]["max_ongoing_requests"]
    assert doc["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


# ---------------------------------------------------------------- RayJobs


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_lifecycle_and_runtime_env(path):
    doc = manifest(path)
    spec = doc["spec"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    # A finished job's cluster holds its GPUs until deleted: a minute for a last look, not an hour.
    assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 300
    assert spec["backoffLimit"] >= 0
    elastic = "elastic" in path.name  # the autoscaler keeps its worker group between min and max
    assert cluster_spec(doc)["enableInTreeAutoscaling"] is elastic
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        if not elastic:
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], "fixed-size job cluster"
    env = runtime_env(doc)
    assert env["working_dir"].startswith(("s3://", "https://")) and env["working_dir"].endswith(".zip")
    # Dependencies come with the image: nothing is installed per job, node and retry.
    assert not {"pip", "uv", "conda"} & set(env), "install dependencies in the Dockerfile, not the runtime env"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_entrypoint_files_and_flags_exist(path, capsys, monkeypatch):
    args = entrypoint(manifest(path))
    assert args[0] == "python"
    check_script_and_flags(args[1], args[2:], capsys, monkeypatch)


def test_elastic_train_job_spans_its_worker_range_on_spot_nodes(capsys, monkeypatch, tmp_path):
    doc = job("train-elastic")
    cfg = resolved_config(*(lambda a: (a[1], a[2:]))(entrypoint(doc)), capsys, monkeypatch, tmp_path)
    (group,) = cluster_spec(doc)["workerGroupSpecs"]
    low, high = cfg.train.worker_range
    assert cfg.train.elastic and cfg.train.global_order and cfg.train.hsdp_replicas == 1
    # The fewest nodes the autoscaler keeps can start the job; the most it adds are all used.
    assert group["minReplicas"] * gpus(group) == low and group["maxReplicas"] * gpus(group) == high
    assert cfg.train.preemption_check_every >= 1 and cfg.train.max_failures >= 1
    spec = group["template"]["spec"]
    hook = " ".join(ray_container(group)["lifecycle"]["preStop"]["exec"]["command"])
    deadline = int(hook.split("--deadline-remaining-seconds=")[1].split()[0])
    # The drain notice reaches Ray before the pod is killed, with time left for a checkpoint.
    assert "ray drain-node" in hook and "DRAIN_NODE_REASON_PREEMPTION" in hook
    assert 0 < deadline < spec["terminationGracePeriodSeconds"]
    assert any("capacityType" in k or "spot" in k for k in spec["nodeSelector"])
    fixed = resolved_config(*(lambda a: (a[1], a[2:]))(entrypoint(job("train"))), capsys, monkeypatch, tmp_path)
    assert cfg.train.batch_size == fixed.train.batch_size  # the same global batch as the fixed 16-GPU job


def test_train_job_gpus_equal_num_workers(capsys, monkeypatch, tmp_path):
    doc = job("train")
    args = entrypoint(doc)
    cfg = resolved_config(args[1], args[2:], capsys, monkeypatch, tmp_path)
    assert cfg.preset == "0.5b" and cfg.train.use_gpu and cfg.codec.kind == "autoencoder_kl"
    assert cfg.train.run_name, "a fixed run name, so that a retried job resumes instead of starting over"
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.cache_root.startswith("s3://")
    assert cfg.codec.path.startswith("s3://") and cfg.text.name.startswith("s3://")
    total_gpus, total_cpus = worker_totals(doc)
    assert total_gpus == cfg.train.num_workers == 16
    # Train workers must leave CPUs on each pod for Ray Data's read and map tasks.
    assert cfg.train.num_workers * cfg.train.cpus_per_worker <= total_cpus / 2
    assert cfg.train.max_failures >= 1, "worker failures are retried inside the job"


def test_preprocess_job_matches_encoder_pool_and_training_cache(capsys, monkeypatch, tmp_path):
    from selfe.data.cache import cache_dir

    doc = job("preprocess")
    args = entrypoint(doc)
    cfg = resolved_config(args[1], args[2:], capsys, monkeypatch, tmp_path)
    total_gpus, total_cpus = worker_totals(doc)
    assert cfg.data.encode_gpus == 1.0 and cfg.data.encode_actors == total_gpus == 8
    assert cfg.data.encode_actors * cfg.data.encode_cpus + cfg.data.decode_cpus <= total_cpus
    train_args = entrypoint(job("train"))
    train_cfg = resolved_config(train_args[1], train_args[2:], capsys, monkeypatch, tmp_path)
    assert cache_dir(cfg) == cache_dir(train_cfg), "training would not find the cache the preprocess job writes"


def test_sweep_job_fits_whole_trials(capsys, monkeypatch, tmp_path):
    from selfe.data.cache import cache_dir
    from selfe.sweep.resources import max_concurrent_trials

    doc = job("sweep")
    args = entrypoint(doc)
    code, out, err = run_script(args[1], [*args[2:], "--print-space"], capsys, monkeypatch)
    assert code == 0, f"the sweep rejects its space file: {err}"
    spec_json = json.loads(out)
    assert spec_json["name"], "a fixed sweep name, so that a retried job restores the sweep"
    assert spec_json["storage_path"].startswith("s3://")
    from selfe.sweep.space import load_space

    spec = load_space(REPO / args[args.index("--space") + 1])
    base = spec.base_config()
    assert base.train.use_gpu
    total_gpus, total_cpus = worker_totals(doc)
    assert total_gpus % base.train.num_workers == 0
    concurrent = max_concurrent_trials(base, {"CPU": total_cpus, "GPU": float(total_gpus)}, spec.max_concurrent)
    assert concurrent == total_gpus // base.train.num_workers == 4, "CPUs, not GPUs, would limit the trials"
    train_args = entrypoint(job("train"))
    train_cfg = resolved_config(train_args[1], train_args[2:], capsys, monkeypatch, tmp_path)
    assert cache_dir(base) == cache_dir(train_cfg), "the sweep would re-encode the data"
    if spec.config and not Path(spec.config).is_absolute():  # Tune would chdir trials away from it
        assert runtime_env(doc)["env_vars"]["RAY_CHDIR_TO_TRIAL_DIR"] == "0"


def test_long_lived_cluster_can_hold_the_training_job():
    spec = manifest(CLUSTERS / "kuberay" / "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    capacity = sum(g["maxReplicas"] * gpus(g) for g in spec["workerGroupSpecs"])
    assert capacity >= load_config(REPO / "clusters/configs/0.5b.toml").train.num_workers


# ---------------------------------------------------------------- AWS cluster launcher


def test_aws_cluster_yaml_is_valid_and_installs_the_project():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS.read_text())
    validate_config(prepare_config(yaml.safe_load(AWS.read_text())))  # Ray's own schema, no AWS calls
    repo_mount = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    setup = raw["setup_commands"]
    assert pinned(setup, "torch") in pyproject_dependency("torch")
    torch_step = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_step = next(i for i, c in enumerate(setup) if re.search(rf"cd {re.escape(repo_mount)} && pip install -e \.$", c))
    assert torch_step < project_step, "CUDA torch first, or pip resolves a default torch for the project"
    assert "~/.ray/auth_token" in raw["file_mounts"].values()
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token" in cmd
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != raw["head_node_type"]]
    reachable = min(raw["max_workers"] * max(n["resources"]["GPU"] for n in workers),
                    sum(n["max_workers"] * n["resources"]["GPU"] for n in workers))
    assert reachable >= load_config(REPO / "clusters/configs/0.5b.toml").train.num_workers
    enabled = [n for n in workers if n["max_workers"] > 0]  # on-demand and spot nodes of one instance type
    assert len({n["node_config"]["InstanceType"] for n in enabled}) == 1, "one GPU type per cluster (FSDP pace)"
    assert any(n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in enabled)


# ---------------------------------------------------------------- the runbook


def readme_commands() -> list[list[str]]:
    """`python <script> ...` of every command in the runbook's code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTERS / "README.md").read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line.split(" #")[0])
        if "python" in words:
            commands.append(words[words.index("python"):])
    return commands


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c[1:3]))
def test_readme_commands_run_with_their_configs(command, capsys, monkeypatch):
    script, args = command[1], command[2:]
    help_text = check_script_and_flags(script, args, capsys, monkeypatch)
    dry_run = next((f for f in ("--print-config", "--print-space") if f in help_text), None)
    if dry_run:  # the config loads and every --section.field override is accepted
        code, _, err = run_script(script, [*args, dry_run], capsys, monkeypatch)
        assert code == 0, err


def test_readme_names_files_that_exist():
    text = (CLUSTERS / "README.md").read_text()
    paths = set(re.findall(r"\b(?:clusters|pipelines|tune)/[\w./-]+\.(?:yaml|toml|py)\b", text))
    assert paths, "the runbook names no files"
    assert [p for p in sorted(paths) if not (REPO / p).is_file()] == []
    for path in MANIFESTS:
        assert f"kubectl apply -f clusters/kuberay/{path.name}" in text or path.name == "raycluster.yaml"


def test_mlflow_server_is_authenticated_and_fenced():
    """No pod may repoint @champion: the server config enables basic auth without a stored password,
    and the NetworkPolicy admits only labelled namespaces, on the server's port only."""
    import configparser

    auth = configparser.ConfigParser()
    auth.read(CLUSTERS / "mlflow" / "basic_auth.ini")
    assert auth["mlflow"]["authorization_function"].endswith("authenticate_request_basic_auth")
    assert "admin_password" not in auth["mlflow"]
    (policy,) = yaml.safe_load_all((CLUSTERS / "mlflow" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"selfe.io/mlflow-client": "true"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    readme = (CLUSTERS / "README.md").read_text()
    assert "--app-name basic-auth" in readme and "networkpolicy.yaml" in readme
