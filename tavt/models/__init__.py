"""TAVT's ViT-pytorch-style model (`modeling.VisionTransformer`) and its ml_collections configs."""
