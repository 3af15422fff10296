"""Kubeflow components: one thin module per microjob, each calling one vla_core entry point.

Imports vla_core and kfp only (tests/test_layering.py). `components.platform` is the one place that says
which image, node pool, GPUs, secrets and volumes each microjob gets, and holds the names it shares with
the Helm chart (checked against the rendered chart by a test)."""
