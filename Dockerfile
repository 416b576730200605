# GPU image for the same pipeline. The torch/torchvision pins in requirements.lock are CUDA 13.0
# builds that bring their own CUDA libraries (nvidia-* wheels); the base image supplies the matching
# runtime and driver glue (tests/test_docker.py keeps its CUDA version equal to the lock's cuda-toolkit).
#   docker build -t fbta .
#   docker run --gpus all -v /cohorts/x:/home/fbta/app/data fbta                 # the pipeline: dvc repro
#   docker run --gpus all fbta fbta tile data.slides=/cohorts/x/slides ...       # any one stage
#   docker run --gpus all fbta python flows/pipeline.py                          # the Prefect flow
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HUB_OFFLINE=1

# Ubuntu's point releases of these move under a fixed tag; the Python stack itself is pinned by the lock.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 fbta
WORKDIR /home/fbta/app
# The lock first: the 6 GB dependency layer is rebuilt only when the pins change.
COPY --chown=1000:1000 requirements.lock pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install pip==26.3 \
 && /opt/venv/bin/pip install -r requirements.lock
COPY --chown=1000:1000 . .
RUN /opt/venv/bin/pip install --no-deps -e . \
 && chown -R 1000:1000 /home/fbta/app /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PREFECT_HOME=/home/fbta/app/.prefect
USER 1000:1000

# The pipeline is the default command; any other command (fbta <stage>, python flows/...) replaces it.
CMD ["dvc", "repro"]
