"""Calibration data for post-training methods: what each Linear sees along real sampling trajectories."""

from ditq.calib.capture import CalibData, calibrate

__all__ = ["CalibData", "calibrate"]
