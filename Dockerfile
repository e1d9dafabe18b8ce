# The image every node of a selfe cluster runs: Ray's GPU image of the pinned Ray version, CUDA PyTorch
# and this package with all its dependencies, installed once at build time instead of by every RayJob on
# every node, run and retry (the runtime env's `pip:`). The job's code still comes from its working_dir
# (a zip of the checkout); Ray puts it first on PYTHONPATH, so a job runs the code it was submitted with
# on the dependencies baked in here.
#
#   docker build -t REGISTRY/selfe:0.1.0-ray2.60.0-py311-gpu .
#   docker push REGISTRY/selfe:0.1.0-ray2.60.0-py311-gpu    # then use it in clusters/kuberay/*.yaml
#
# tests/test_clusters.py keeps the Ray version, the Python tag, the torch pin and the manifests' image
# in step with pyproject.toml; it builds the image where a Docker daemon answers.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# CUDA 12.8 wheels; torch==2.13.0 is the top of pyproject's torch range (the CPU build of the same
# version is what CI tests).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Dependencies first, from pyproject alone, so that code edits do not invalidate this layer. The folder
# is made by the image's `ray` user (WORKDIR alone would make it root's, and `pip install .` writes in it).
RUN mkdir -p /home/ray/src/selfe
WORKDIR /home/ray/src/selfe
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('torch')))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The package itself (non-editable) and the entry points, configs and manifests it runs with.
COPY --chown=ray:users selfe ./selfe
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users clusters ./clusters
RUN pip install --no-cache-dir --no-deps . && python -c "import selfe.train.job, selfe.sweep.runner"

ENV HF_HUB_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0
