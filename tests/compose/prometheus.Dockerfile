# The compose test's stand-in for prom/prometheus (no registry here): Debian's prometheus binary
# and busybox's wget (the health check in docker-compose.yml) on the test's debootstrapped base.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
COPY busybox /bin/busybox
RUN ln -s /bin/busybox /usr/local/bin/wget \
 && mkdir -p /prometheus /etc/prometheus \
 && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
