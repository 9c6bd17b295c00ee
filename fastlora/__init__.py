"""fastlora: LoRA layers with fused Triton kernels and a lean PyTorch reference path."""
