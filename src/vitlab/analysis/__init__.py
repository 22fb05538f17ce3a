"""What the model learns: attention maps, rollout, attention distance and embedding structure (ViT paper §4.5)."""

from vitlab.analysis.attention import (attention_maps, attention_rollout, cross_attention_maps, mean_attention_distance,
                                      rollout_matrix)
from vitlab.analysis.embeddings import patch_embedding_components, position_embedding_similarity

__all__ = ["attention_maps", "attention_rollout", "cross_attention_maps", "mean_attention_distance",
           "patch_embedding_components", "position_embedding_similarity", "rollout_matrix"]
