"""Reading curated WebDataset shards for training."""

from lvd.training.data.loader import ShardLoader, build_loader, resolve_shards

__all__ = ["ShardLoader", "build_loader", "resolve_shards"]
