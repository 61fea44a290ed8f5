# A base image for `python -m launch.xpk --base_docker_image=IMAGE`: this repo's dependencies
# (with jax[tpu]) installed once, so that pods do not pip install them at every start. It
# records the sha256 of the setup.py and constraints.txt it installed from; the xpk command
# skips its install while the repo's two files hash the same (else it installs, as without).
# Build it from the repo's root on the machine that runs xpk, and pass its local name: xpk
# layers --script_dir only on a local image (its docker_image.py refuses --script-dir with a
# gcr.io or docker.pkg.dev one), then pushes the result itself:
#   docker build -f launch/xpk-base.Dockerfile -t yuanjax-deps .
#   python -m launch.xpk --base_docker_image=yuanjax-deps ...
FROM python:3.11
WORKDIR /opt/yuanjax-deps
COPY setup.py constraints.txt ./
# No yuanjax/ here: setup.py's dependencies are installed, not yuanjax itself (it runs from the
# folder xpk copies in), and the empty distribution is uninstalled again.
RUN pip install --no-cache-dir -c constraints.txt . 'jax[tpu]' \
    && pip uninstall -y yuanjax \
    && cat setup.py constraints.txt | sha256sum > /opt/yuanjax-deps.sha256
