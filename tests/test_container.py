"""The container image every cluster pod runs (the repository's Dockerfile): its pins agree with
pyproject.toml and the manifests, what it copies exists, and it builds where a Docker daemon answers."""

from __future__ import annotations

import re

import pytest
import ray

from tests.test_clusters import REPO, pyproject_dependency, selfe_image

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_builds_on_the_pinned_ray_and_torch():
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == ray.__version__ and "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in text
    assert args["TORCH_VERSION"] in pyproject_dependency("torch")
    assert selfe_image().endswith(f"-ray{args['RAY_VERSION']}-py311-gpu")
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M)
    sources = [s for line in copied for s in line.split()]
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for source in sources:  # what the build copies exists and is not kept out of the build context
        assert (REPO / source).exists() and source not in ignored, source
    for package in ("selfe", "pipelines", "tune", "clusters"):
        assert package in sources, f"the image lacks {package}/"


@pytest.mark.slow
def test_the_image_builds_where_a_docker_daemon_answers(tmp_path):
    import shutil
    import subprocess

    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker daemon here (`docker info` fails): the image is not built; "
                    "build it with `docker build -t TAG .` where Docker runs")
    build = subprocess.run([docker, "build", "-t", "selfe-ci-check", str(REPO)], capture_output=True, text=True,
                           timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    probe = subprocess.run([docker, "run", "--rm", "selfe-ci-check", "python", "-c",
                            "import ray, torch, selfe.train.job; print(ray.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0 and probe.stdout.split()[0] == ray.__version__, probe.stderr[-2000:]
