from .attention import ConvNNAttention, ConvNNBranchAttention
from .common import NeighborAggregation, check_convnn_args
from .conv2d import ConvNN2d, ConvNNBranch2d, conv2d_weight_to_convnn
from .functional import gather_dot, neighbor_aggregate, select_neighbors, similarity_features
from .backend import get_backend, set_backend
