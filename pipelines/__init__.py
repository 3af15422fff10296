"""The pipeline graph (matrix.py), its compiled YAML (matrix.yaml, committed) and the local-run / submit
helpers. Imports components (and kfp) only."""
