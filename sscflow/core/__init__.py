"""The ground every stage stands on: physical geometry (the one SimpleITK boundary), the Zarr store
and its resume contract, image reading."""
