"""Datasets: the soft arm's recorded episodes as training samples."""
