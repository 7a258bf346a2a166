# Tollway in a container: a build stage that compiles the hot path into a wheel, and a slim runtime
# stage that installs it and runs as an unprivileged user.
#   docker build -t tollway .
#   docker run -p 8000:8000 -v $PWD/tollway.yaml:/etc/tollway/tollway.yaml:ro tollway
# The config must listen on 0.0.0.0:8000 and keep its status listener on port 8100 (the health check
# below asks it); /var/lib/tollway is the one directory the process may write. compose.yaml runs
# three nodes with Redis and the demo's user services.
ARG PYTHON_VERSION=3.11

# -- build: wheels of tollway (compiled) and of every dependency ----------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tollway ./tollway
# A wheel without its compiled hot path is a build failure here, not a silent fallback.
ENV TOLLWAY_REQUIRE_COMPILED=1 TOLLWAY_BUILD_CACHE=off PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: no compiler, no build tools, not root -----------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 tollway \
    && useradd --system --uid 10001 --gid tollway --no-create-home --shell /usr/sbin/nologin tollway \
    && install -d -o tollway -g tollway /var/lib/tollway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels tollway \
    && rm -rf /wheels
WORKDIR /etc/tollway
USER tollway:tollway
EXPOSE 8000 8100
# The status listener: /ready answers 200 while the node takes traffic, 503 while it drains.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8100/ready', timeout=2).status != 200)"]
# SIGTERM drains: /ready turns 503, in-flight requests finish, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollway"]
CMD ["run", "--config", "/etc/tollway/tollway.yaml"]
