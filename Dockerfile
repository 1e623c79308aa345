# Worker image for the k8s manifests (frontend + native dynamo_dwdp workers), on a CUDA PyTorch base.
# Not built in CI. Build and push:
#   docker build -t myreg/dynamo-dwdp:dev .            # optionally --build-arg BASE_IMAGE=...
#   docker push myreg/dynamo-dwdp:dev
#   dynamo-dwdp k8s render graphs/disagg_dwdp_decode.yaml -f configs/h200-v2lite.yaml --image myreg/dynamo-dwdp:dev
# The project is installed with the same scripts/setup.sh CI uses, with its opt-in knobs: the venv sees
# the base image's CUDA torch (VENV_SYSTEM_SITE_PACKAGES=1, SKIP_TORCH=1) and no etcd server is
# installed (SKIP_ETCD=1: pods use Kubernetes discovery). ai-dynamo 1.6.1 and NIXL (CUDA 12 build)
# come from PyPI as in CI. The image tag is this project's version, not Dynamo's, so the renderer
# always sets runtimeVersionOverride (k8s.runtime_version, 1.6.1).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/dwdp-venv \
    VENV_SYSTEM_SITE_PACKAGES=1 \
    SKIP_TORCH=1 \
    SKIP_ETCD=1

WORKDIR /workspace/dynamo-dwdp
COPY . .
RUN ./scripts/setup.sh && rm -rf /root/.cache

# `python3` in the manifests is the venv's (the base image's CUDA torch is visible through it).
ENV PATH=/opt/dwdp-venv/bin:${PATH}
RUN python3 -c "import torch, dynamo, dynamo_dwdp; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 8000: frontend HTTP; 9090+r: Dynamo system port (/live, /health, /metrics) of rank r.
EXPOSE 8000 9090
CMD ["python3", "-m", "dynamo_dwdp.cli", "--help"]
