# The rbdplugin daemon as a container image: the rootfs of the managed Docker plugin
# (`make plugin`, plugin/README.md). BASE is any Debian bookworm: debian:bookworm-slim
# where a registry is reachable, or the local one plugin/make-base debootstraps.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY plugin/packages /tmp/packages
# Extra CAs (plugin/ca/*.crt, e.g. an intercepting proxy's) join Debian's bundle, which
# pip is pointed at.
COPY plugin/ca/ /usr/local/share/ca-certificates/rbdplugin/
RUN apt-get update --error-on=any \
    && grep -v '^#' /tmp/packages | xargs apt-get install -y --no-install-recommends \
    && update-ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/packages /usr/local/share/ca-certificates/rbdplugin/README \
    && rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /usr/share/info/*

# The daemon: a wheel built from this checkout, installed into a venv over Debian's
# python3 (which has the rados/rbd bindings); aiohttp and friends come from PyPI.
COPY pyproject.toml README.md /src/
COPY rbdplugin /src/rbdplugin
RUN python3 -m venv --system-site-packages /opt/rbdplugin \
    && /opt/rbdplugin/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels /src \
    && /opt/rbdplugin/bin/pip install --no-cache-dir /tmp/wheels/rbdplugin-*.whl \
    && rm -rf /src /tmp/wheels \
    && /opt/rbdplugin/bin/rbdplugin --version

COPY plugin/entrypoint /usr/local/bin/rbdplugin-entrypoint
RUN mkdir -p /etc/rbdplugin /etc/ceph /var/lib/rbdplugin/mounts /var/lib/rbdplugin/state /run/docker/plugins
ENV RBDPLUGIN_CONFIG=/etc/rbdplugin/rbdplugin.toml
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/rbdplugin-entrypoint"]
