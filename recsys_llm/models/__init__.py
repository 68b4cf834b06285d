"""CTR backbones on EmbeddingBagCollection (FM, FwFM, DeepFM, DCNv2, FinalMLP, DLRM)."""
