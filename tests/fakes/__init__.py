"""Fakes of GPU libraries (TensorRT, CuPy) that speak their documented Python API."""
