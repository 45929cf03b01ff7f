# The application image: web, scheduler, worker and Flower all run from it (docker-compose.yml).
# Python 3.11 slim, pinned by version tag and digest (the multi-arch index of that tag); override with
# --build-arg PYTHON_IMAGE=... to move to a newer patch release.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- build: the virtualenv, from the runtime requirements only (no test or lint tools) ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements/base.txt /tmp/requirements/base.txt
RUN /opt/venv/bin/pip install --no-compile -r /tmp/requirements/base.txt

# --- runtime ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# The uid owns /logs and /uploads; match it to the host user that owns the bind-mounted folders.
ARG APP_UID=1000
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CYBER_BRAIN_LOGS=/logs \
    UPLOADS_DIR=/uploads
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin app \
 && mkdir -p /app /logs /uploads \
 && chown app:app /logs /uploads
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The code stays root-owned: the app user can read it, not change it.
COPY . /app
# collectstatic imports the settings, which refuse to load without SECRET_KEY. The dummy key is set for
# this one command only (not ENV), so it is not in the image's environment; nothing signed with it
# survives the build.
RUN SECRET_KEY=collectstatic-build-only-dummy-key python manage.py collectstatic --noinput --verbosity 0
USER app
EXPOSE 9595 5555
CMD ["gunicorn", "project.wsgi", "--bind", "0.0.0.0:9595", "--workers", "2", "--access-logfile", "-"]
