"""Names of the environment variables the microjobs read: defined once, used by vla_core (storage,
telemetry), by the components' platform settings (which inject them from the chart's secrets and config
map) and checked against the chart by tests/test_chart.py.

The object-store variables are boto3's standard credential chain; nothing here invents new ones for them.
"""

# object storage (boto3's standard chain; AWS_ENDPOINT_URL points it at MinIO / SeaweedFS / Ceph)
AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
AWS_REGION = "AWS_DEFAULT_REGION"
# where a run's results are published when a command is not told (s3://bucket/prefix or a folder)
RESULTS_URI = "WMVLA_RESULTS_URI"
# local cache root for datasets given as s3:// URIs (default ~/.cache/wmvla/datasets/<bucket>/<prefix>)
DATASET_CACHE = "WMVLA_DATASET_CACHE"

# Hugging Face: token for gated models, and the cache the chart's model-cache volume is mounted at
HF_TOKEN = "HF_TOKEN"
HF_HOME = "HF_HOME"

# metrics (vla_core.telemetry): an HTTP endpoint on this port, and/or pushes to this Pushgateway
METRICS_PORT = "WMVLA_METRICS_PORT"
PUSHGATEWAY_URL = "WMVLA_PUSHGATEWAY_URL"
# the address the endpoint binds (default 0.0.0.0: the pod IP the PodMonitor scrapes; tests use 127.0.0.1)
METRICS_ADDR = "WMVLA_METRICS_ADDR"
# the labels every metric of a job carries (bounded: one run, one cell, one microjob, one shard)
RUN_ID = "WMVLA_RUN_ID"
CELL = "WMVLA_CELL"
MICROJOB = "WMVLA_MICROJOB"
SHARD = "WMVLA_SHARD"
