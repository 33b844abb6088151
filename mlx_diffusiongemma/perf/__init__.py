"""Performance accounting, independent of the hardware: the work of a denoising step (FLOPs, weight
bytes, cache copies, host synchronisations) in `accounting.py`, and what a split over ranks
exchanges in `communication.py`."""
