"""Hugging Face Hub model-card templates (``string.Template``), one per model family; see ``timm_convnn.hub``."""
