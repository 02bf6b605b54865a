"""Evaluation: perplexity, BLEU and ROUGE (`metrics`), and the harmful-text classifier (`safety`, `safety_corpus`).

Submodules are imported on use: `metrics` pulls in sacrebleu and rouge-score only when a score is asked for.
"""
