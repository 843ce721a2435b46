# raftkvd's image, built with no registry: FROM scratch, holding only the file system that
# docker/build-image.sh stages under target/image-root (the binary, the libraries it
# loads, /etc/passwd; and an empty /data). Build it with that script, which ends in
# `docker build -t raftkvd .`; run it as docker-compose.yml does.
FROM scratch
COPY target/image-root/ /
# /data is the volume: the one directory the non-root user owns.
COPY --chown=10001:10001 target/image-data/ /data/
USER 10001:10001
ENV RAFTKVD_DATA_DIR=/data \
    RAFTKVD_LISTEN_HOST=0.0.0.0 \
    RAFTKVD_PORT=2379
VOLUME ["/data"]
EXPOSE 2379 2380
# `raftkvd probe` GETs this node's /health on RAFTKVD_PORT (there is no curl in here).
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
    CMD ["/bin/raftkvd", "probe"]
# SIGTERM: the node hands off the leadership of every group it leads, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/raftkvd"]
