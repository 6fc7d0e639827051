#!/usr/bin/env bash
# EMR bootstrap action: install glan-spark's Python dependencies on every node.
# Upload the wheel next to this script: aws s3 cp dist/glan_spark-*.whl s3://CHANGE-ME-bucket/glan/
set -euo pipefail
aws s3 cp "s3://CHANGE-ME-bucket/glan/glan_spark-0.1.0-py3-none-any.whl" /tmp/
sudo python3 -m pip install "/tmp/glan_spark-0.1.0-py3-none-any.whl"
