# The image cluster/kuberay.yaml and `kvray launch --kuberay` run: Ray's GPU image (its Ray is the rayVersion
# of the manifests) with this checkout of kvray and its dependencies installed. Build from the repository root:
#   docker build -f cluster/kuberay.Dockerfile -t REGISTRY/kvray:0.1.0 . && docker push REGISTRY/kvray:0.1.0
# torch comes from PyPI with the CUDA build pip picks for the image's Python; pin your own wheel index where
# the GPUs need another CUDA. (Not built in kvray's tests: the test machine has no Docker.)
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users pyproject.toml README.md /home/ray/kvray/
COPY --chown=ray:users kvray /home/ray/kvray/kvray
RUN pip install --no-cache-dir /home/ray/kvray
