# syntax=docker/dockerfile:1
# The example Django project's worker, run by celeriac. Configure it with environment variables
# only: CELERY_BROKER_URL, CELERY_RESULT_BACKEND, CELERIAC_CONCURRENCY, CELERIAC_LOGLEVEL, ...
#
#   docker build -t celeriac-example .
#   docker run --rm -e CELERY_BROKER_URL=redis://redis:6379/0 \
#       -e CELERY_RESULT_BACKEND=redis://redis:6379/1 celeriac-example
#
# To add celeriac to your own app image, build stage 1 with your image's Python and
#   COPY --from=build /src/target/release/celeriac /src/target/release/celeriac-zygote /usr/local/bin/

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- stage 1: build the binary against the same Python the final image runs -------------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH \
    PYO3_PYTHON=/usr/local/bin/python3
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY crates ./crates
COPY python ./python
COPY link ./link
RUN cargo build --release --locked

# --- stage 2: the app, its requirements and the binary; no build tools ------------------------
FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 app \
 && mkdir -p /app/data && chown -R app:app /app
WORKDIR /app
COPY examples/django_project/requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY --chown=app:app examples/django_project/ ./
COPY --from=build /src/target/release/celeriac /src/target/release/celeriac-zygote /usr/local/bin/
USER app
ENV PYTHONUNBUFFERED=1 \
    DJANGO_DB_PATH=/app/data/db.sqlite3 \
    CELERIAC_LOGLEVEL=INFO
RUN python manage.py migrate --noinput
CMD ["celeriac", "-A", "core", "worker"]
