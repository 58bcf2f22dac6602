"""``bwskc train``: train a model's lowered program in the seeds' three modes and two experiments.

Stages: ``data`` (text splits through ``datasets``, the tokenizer, token blocks), ``loop`` (one run:
AdamW, cosine schedule with warmup, clipping, evaluation, early stopping, checkpoints, resume),
``output`` (the published layout, tables and plots), ``distributed`` (``--nproc N`` data parallel).
"""
