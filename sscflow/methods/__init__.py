"""The numerical methods: segmentation, registration backends, log-Jacobians, templates, group
reductions, statistics and the classifier. No Dask, no store bookkeeping beyond their own
outputs."""
