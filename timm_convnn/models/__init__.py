"""timm model entrypoints; importing this package registers every ConvNN model in timm's registry."""
from .vit_convnn import *
