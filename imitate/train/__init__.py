"""train: records -> batches -> student (SFT, logit/feature KD, SCKD) -> outputs."""
