"""Pieces of the fine-tuning job: prompt masking, batching, the lr schedule, the tokenised cache."""
