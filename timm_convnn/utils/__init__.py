from .memory import peak_rss_delta
from .stats import convnn_aggregation_flops, count_flops, count_params
