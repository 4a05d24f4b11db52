# The streamrec dataflow: `docker build -t streamrec .` then `docker run streamrec run --help`
# (or `docker compose up`, see docker-compose.yml). Settings come from RECSYS_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The embedding model ships inside a Python package; never reach for the Hub at run time.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    # glibc's heap in transparent huge pages: a growing process takes ~4x fewer page faults,
    # which cost the head's training step 40-100 ms each second of a cold live flow (README,
    # "Operating it": the memory allocator).
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1

# The CPU build of torch first, in its own layer: the default index would pull ~3 GB of
# CUDA libraries the dataflow never uses. Keep the pin equal to pyproject.toml's.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY . .
# The signals' numba loops compiled once here, into the installed package's cache, so no
# container compiles them during its first batch (run from / to import the installed copy).
RUN pip install . \
    && (cd / && python -m recsys.signals.compile_kernels) \
    && useradd --create-home --uid 10001 recsys \
    && mkdir -p /data/state /data/recovery /data/embeddings /data/exchange-snapshots \
    && chown -R recsys:recsys /data

# Fresh named volumes copy this ownership, so the non-root user can write its state (a volume
# mounted where the image has no directory would be root's: docker-compose.yml's
# exchange-snapshots, shared by the shard replicas and the trainer, needs its directory here).
USER recsys
VOLUME ["/data/state", "/data/recovery", "/data/embeddings", "/data/exchange-snapshots"]
ENV RECSYS_STATE_DIR=/data/state \
    RECSYS_RECOVERY_DIR=/data/recovery \
    RECSYS_EMBED_CACHE_DIR=/data/embeddings \
    RECSYS_EXCHANGE_SNAPSHOT_DIR=/data/exchange-snapshots

ENTRYPOINT ["recsys"]
CMD ["run"]
