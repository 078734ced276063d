"""timm model entrypoints; importing this package registers every ConvNN model in timm's registry."""
from .resnet_convnn import *
from .vgg_convnn import *
from .vit_convnn import *
