from .memory import peak_rss_delta
