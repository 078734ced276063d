"""timm model entrypoints (ViT and CNN families) are registered here by their modules on import."""
