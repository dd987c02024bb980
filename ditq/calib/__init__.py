"""Calibration data for post-training methods: what each Linear sees, step by step, as the model runs."""

from ditq.calib.capture import calibrate
from ditq.calib.data import CalibData

__all__ = ["CalibData", "calibrate"]
