# The two set-up commands of the README. Each installs what it needs when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEB_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools systemd iproute2 chromium chromium-driver
# promtool only (tests/test_prometheus_rules.py) and PostgreSQL's programs (tests start their own cluster
# with initdb and pg_ctl: tests/conftest.py): installed without their recommends, their servers neither
# started (a policy-rc.d refuses it for the install) nor enabled at boot.
DEB_TOOL_PACKAGES := prometheus postgresql

IMAGE ?= localhost/medsendx-edge:latest
BASE_IMAGE ?= localhost/medsendx-base:bookworm
IMAGE_DEB_PACKAGES := podman mmdebstrap

.PHONY: demo test typecheck venv deb bench clean image

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)
	$(PY) -m pip install --quiet -e '.[test]'

deb:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@missing=""; for p in $(DEB_TOOL_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "installing Debian packages for their tools only (services not started):$$missing"; \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && $$SUDO chmod 755 /usr/sbin/policy-rc.d && guard=1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  rc=$$?; [ -n "$$guard" ] && $$SUDO rm -f /usr/sbin/policy-rc.d; \
	  for p in $$missing; do \
	    $$SUDO systemctl disable --now $$p.service >/dev/null 2>&1 || $$SUDO deb-systemd-helper disable $$p.service >/dev/null 2>&1 || true; \
	    $$SUDO update-rc.d $$p disable >/dev/null 2>&1 || true; \
	  done; \
	  [ $$rc = 0 ]; \
	fi

## Run the main job on the embedded default: a realistic batch through every stage into var/demo/archive.
demo: $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	$(VENV)/bin/medsendx-edge demo --workdir var/demo

## Run the test suite (installs the Debian packages and the test extras first).
test: deb venv
	$(PY) -m pytest -q -p no:cacheprovider tests

## Static types: mypy --strict on the package (settings in pyproject.toml); CI runs it after the tests.
typecheck: venv
	$(PY) -m mypy

## The OCI image (Containerfile, docs/container.md), built without a registry, then checked by running its
## entrypoint in a chroot of its file system (this machine cannot run containers).
image: $(PY)
	@missing=""; for p in $(IMAGE_DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	rm -rf dist && $(PY) -m pip wheel --quiet --wheel-dir dist .
	podman image exists $(BASE_IMAGE) || { mkdir -p build && \
	  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
	    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
	    bookworm build/base.tar && podman import build/base.tar $(BASE_IMAGE) && rm -f build/base.tar; }
	podman build --isolation chroot --format docker --build-arg BASE=$(BASE_IMAGE) -t $(IMAGE) -f Containerfile .
	container/check-image.sh $(IMAGE)

bench: deb venv
	$(PY) benchmarks/bench_segment.py
	$(PY) benchmarks/bench_triage.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_upload.py
	$(PY) benchmarks/bench_fleet.py
	$(PY) benchmarks/bench_fleet_recall.py --baseline
	$(PY) benchmarks/bench_fleet_onset.py
	$(PY) benchmarks/bench_anonymize.py
	$(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_dimse.py
	$(PY) benchmarks/bench_link.py backlog
	$(PY) benchmarks/bench_link.py big --mb 500

clean:
	rm -rf var build *.egg-info
