"""vitsam: train ViT, MLP-Mixer and ResNet from scratch with SAM, and measure why it works."""

__version__ = "0.1.0"
