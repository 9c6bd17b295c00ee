"""Triton kernels and their launchers (imported as ``fastlora.kernels``; imports only torch and triton)."""
