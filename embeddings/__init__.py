"""Embedding models: the DINOv2 ViT (`vit`), checkpoint loading (`checkpoints`), evaluation
preprocessing (`preprocess`), inference wrappers (`models`) and the embeddings tables (`store`)."""
