#!/bin/sh
# g++ and the Python headers, which torch.compile needs to build the int8 variants' fused kernels.
# Run by both stages of docker/Dockerfile (Debian base images).
set -eu
apt-get update
apt-get install -y --no-install-recommends g++
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || apt-get install -y --no-install-recommends python3-dev
rm -rf /var/lib/apt/lists/*
