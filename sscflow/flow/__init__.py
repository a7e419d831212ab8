"""Running the stages: the pipeline built from the stage table, the store lease, the Dask cluster
(local, remote, Kubernetes) and the Prometheus metrics."""
