"""timm-convnn: Convolutional Nearest Neighbors (arXiv 2511.14137) as timm layers and models.

``import timm_convnn`` makes the ConvNN layers available and registers the package's models in timm's registry.
"""
from .version import __version__
from .layers import ConvNN2d, ConvNNAttention, ConvNNBranch2d, conv2d_weight_to_convnn
from . import models
