"""Training: the paper's preference data (data.py), DPO training of one LoRA adapter per
attribute with TRL (train.py), and the weight-merging baseline (merge.py)."""
